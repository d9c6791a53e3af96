//! A minimal QMP (QEMU Machine Protocol) client over a unix socket.
//!
//! One short-lived connection per command: connect, read the greeting,
//! negotiate capabilities, execute, and wait for the answer, skipping the
//! asynchronous events QEMU interleaves (a `POWERDOWN` event can arrive
//! before the `return` of `system_powerdown`).

use std::path::Path;
use std::time::Duration;

use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;

use super::DriverError;

const TIMEOUT: Duration = Duration::from_secs(5);

async fn read_reply(
    lines: &mut tokio::io::Lines<BufReader<tokio::net::unix::OwnedReadHalf>>,
) -> Result<Value, DriverError> {
    loop {
        let line = tokio::time::timeout(TIMEOUT, lines.next_line())
            .await
            .map_err(|_| DriverError::Qmp("no answer within 5 s".into()))?
            .map_err(|e| DriverError::Qmp(format!("read: {e}")))?
            .ok_or_else(|| DriverError::Qmp("QEMU closed the QMP socket".into()))?;
        let v: Value = serde_json::from_str(&line)
            .map_err(|e| DriverError::Qmp(format!("bad QMP message: {e}")))?;
        if v.get("event").is_some() {
            continue;
        }
        if let Some(err) = v.get("error") {
            return Err(DriverError::Qmp(format!(
                "{}: {}",
                err["class"].as_str().unwrap_or("error"),
                err["desc"].as_str().unwrap_or("")
            )));
        }
        if v.get("return").is_some() || v.get("QMP").is_some() {
            return Ok(v);
        }
    }
}

/// Runs one QMP command and returns its `return` value.
pub async fn execute(
    socket: &Path,
    command: &str,
    args: Option<Value>,
) -> Result<Value, DriverError> {
    let stream = tokio::time::timeout(TIMEOUT, UnixStream::connect(socket))
        .await
        .map_err(|_| DriverError::Qmp("connect timed out".into()))?
        .map_err(|e| DriverError::Qmp(format!("connect {}: {e}", socket.display())))?;
    let (r, mut w) = stream.into_split();
    let mut lines = BufReader::new(r).lines();
    read_reply(&mut lines).await?; // greeting
    let send = |v: Value| {
        let mut s = v.to_string();
        s.push('\n');
        s
    };
    w.write_all(send(json!({"execute": "qmp_capabilities"})).as_bytes())
        .await
        .map_err(|e| DriverError::Qmp(format!("write: {e}")))?;
    read_reply(&mut lines).await?;
    let mut cmd = json!({ "execute": command });
    if let Some(a) = args {
        cmd["arguments"] = a;
    }
    w.write_all(send(cmd).as_bytes())
        .await
        .map_err(|e| DriverError::Qmp(format!("write: {e}")))?;
    let v = read_reply(&mut lines).await?;
    Ok(v["return"].clone())
}

/// `query-status`: the VM's run state (`running`, `paused`, `shutdown`, ...).
pub async fn query_status(socket: &Path) -> Result<String, DriverError> {
    let v = execute(socket, "query-status", None).await?;
    v.get("status")
        .and_then(Value::as_str)
        .map(str::to_string)
        .ok_or_else(|| DriverError::Qmp(format!("query-status: no status in {v}")))
}
