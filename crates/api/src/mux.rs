//! Protocol extension: many hosts on one agent connection ("mux").
//!
//! Protocol v1 gives every host its own WebSocket (`GET /api/v1/agent/connect`).
//! A process that runs many hosts — the simulated hosts of `virt8ra bench
//! scale`, or a gateway in front of many small edge boxes — can instead
//! carry all of them on one WebSocket at `GET /api/v1/agent/mux?version=N`,
//! so that the number of sockets, file descriptors and local ports does not
//! grow with the number of hosts.
//!
//! Negotiation: the client names the mux version it speaks in the query; a
//! control plane that does not know it answers 400, one that predates the
//! extension 404, and the client then falls back to one v1 connection per
//! host. The upgrade request carries a host token (any host of the group);
//! each host then attaches with its *own* host token, so a mux connection
//! can act only for hosts whose credentials it holds.
//!
//! Inside a channel the messages are exactly protocol v1's
//! ([`AgentMessage`]/[`ServerMessage`], including the hello/welcome version
//! negotiation), wrapped with the channel number: one frame per message, JSON
//! text, tagged by `type`.
//!
//! ```text
//! client                                   control plane
//!   attach {ch, host_token}          ──►   authenticates the token
//!   msg {ch, msg: hello{..}}         ──►
//!                                    ◄──   msg {ch, msg: welcome{..}}
//!   msg {ch, msg: heartbeat{..}}     ──►
//!                                    ◄──   msg {ch, msg: desired_state{..}}
//!   detach {ch}                      ──►   (or the server) closed {ch, reason}
//! ```

use serde::{Deserialize, Serialize};

use crate::protocol::{AgentMessage, ServerMessage};

/// The mux version this build speaks.
pub const MUX_VERSION: u32 = 1;

/// Client (agents) to control plane.
///
/// Read through [`UpFrame`], a plain struct: serde reads an internally
/// tagged enum by first buffering the whole object (the tag may come
/// last), and this frame wraps a message that is itself such an enum, so
/// every heartbeat was buffered twice before it was read. The wire format
/// is the derived one either way.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", try_from = "UpFrame")]
pub enum MuxUp {
    /// Opens channel `ch` for the host whose credential is `host_token`.
    Attach { ch: u32, host_token: String },
    /// A protocol v1 message of channel `ch`'s host.
    Msg { ch: u32, msg: Box<AgentMessage> },
    /// Closes channel `ch` (the host goes away).
    Detach { ch: u32 },
}

/// Control plane to client (read through [`DownFrame`], as [`MuxUp`] is).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", try_from = "DownFrame")]
pub enum MuxDown {
    /// A protocol v1 message for channel `ch`'s host.
    Msg { ch: u32, msg: ServerMessage },
    /// Channel `ch` is closed (refused, replaced, or the session ended).
    Closed { ch: u32, reason: String },
}

#[derive(Deserialize)]
#[serde(rename_all = "snake_case")]
enum UpKind {
    Attach,
    Msg,
    Detach,
}

/// Any [`MuxUp`] frame's fields, read in one pass.
#[derive(Deserialize)]
#[doc(hidden)]
pub struct UpFrame {
    #[serde(rename = "type")]
    kind: UpKind,
    ch: u32,
    #[serde(default)]
    host_token: Option<String>,
    #[serde(default)]
    msg: Option<Box<AgentMessage>>,
}

impl TryFrom<UpFrame> for MuxUp {
    type Error = String;
    fn try_from(f: UpFrame) -> Result<MuxUp, String> {
        let ch = f.ch;
        Ok(match f.kind {
            UpKind::Attach => MuxUp::Attach {
                ch,
                host_token: f.host_token.ok_or("attach: missing field `host_token`")?,
            },
            UpKind::Msg => MuxUp::Msg {
                ch,
                msg: f.msg.ok_or("msg: missing field `msg`")?,
            },
            UpKind::Detach => MuxUp::Detach { ch },
        })
    }
}

#[derive(Deserialize)]
#[serde(rename_all = "snake_case")]
enum DownKind {
    Msg,
    Closed,
}

/// Any [`MuxDown`] frame's fields, read in one pass.
#[derive(Deserialize)]
#[doc(hidden)]
pub struct DownFrame {
    #[serde(rename = "type")]
    kind: DownKind,
    ch: u32,
    #[serde(default)]
    msg: Option<ServerMessage>,
    #[serde(default)]
    reason: Option<String>,
}

impl TryFrom<DownFrame> for MuxDown {
    type Error = String;
    fn try_from(f: DownFrame) -> Result<MuxDown, String> {
        let ch = f.ch;
        Ok(match f.kind {
            DownKind::Msg => MuxDown::Msg {
                ch,
                msg: f.msg.ok_or("msg: missing field `msg`")?,
            },
            DownKind::Closed => MuxDown::Closed {
                ch,
                reason: f.reason.ok_or("closed: missing field `reason`")?,
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_wrap_v1_messages_with_their_channel() {
        let up = MuxUp::Msg {
            ch: 7,
            msg: Box::new(AgentMessage::VmReport(crate::protocol::VmReport {
                id: "v".into(),
                phase: crate::protocol::AgentVmPhase::Running,
                error: None,
                ports: vec![],
                reboot_generation: 0,
                machine: None,
            })),
        };
        let v = serde_json::to_value(&up).expect("json");
        assert_eq!(v["type"], "msg");
        assert_eq!(v["ch"], 7);
        assert_eq!(v["msg"]["type"], "vm_report");
        assert_eq!(serde_json::from_value::<MuxUp>(v).expect("back"), up);
        let down: MuxDown =
            serde_json::from_str(r#"{"type":"closed","ch":3,"reason":"x","later":1}"#)
                .expect("unknown fields are ignored");
        assert_eq!(
            down,
            MuxDown::Closed {
                ch: 3,
                reason: "x".into()
            }
        );
    }

    #[test]
    fn every_frame_reads_back_and_bad_frames_say_what_is_wrong() {
        let ups = [
            MuxUp::Attach {
                ch: 1,
                host_token: "t".into(),
            },
            MuxUp::Msg {
                ch: 2,
                msg: Box::new(AgentMessage::DesiredRequest),
            },
            MuxUp::Detach { ch: 3 },
        ];
        for up in ups {
            let text = serde_json::to_string(&up).expect("json");
            assert_eq!(serde_json::from_str::<MuxUp>(&text).expect(&text), up);
        }
        let downs = [
            MuxDown::Msg {
                ch: 4,
                msg: ServerMessage::ReportRequest,
            },
            MuxDown::Closed {
                ch: 5,
                reason: "r".into(),
            },
        ];
        for down in downs {
            let text = serde_json::to_string(&down).expect("json");
            assert_eq!(serde_json::from_str::<MuxDown>(&text).expect(&text), down);
        }
        // The tag may come anywhere in the object.
        let up: MuxUp = serde_json::from_str(r#"{"ch":9,"type":"detach"}"#).expect("tag last");
        assert_eq!(up, MuxUp::Detach { ch: 9 });
        for (bad, says) in [
            (r#"{"type":"attach","ch":1}"#, "host_token"),
            (r#"{"type":"msg","ch":1}"#, "msg"),
            (r#"{"type":"launch","ch":1}"#, "launch"),
            (r#"{"type":"detach"}"#, "ch"),
        ] {
            let e = serde_json::from_str::<MuxUp>(bad)
                .expect_err(bad)
                .to_string();
            assert!(e.contains(says), "{bad}: {e}");
        }
        let e = serde_json::from_str::<MuxDown>(r#"{"type":"closed","ch":1}"#)
            .expect_err("no reason")
            .to_string();
        assert!(e.contains("reason"), "{e}");
    }
}
