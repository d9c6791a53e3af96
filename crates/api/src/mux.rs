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
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum MuxUp {
    /// Opens channel `ch` for the host whose credential is `host_token`.
    Attach { ch: u32, host_token: String },
    /// A protocol v1 message of channel `ch`'s host.
    Msg { ch: u32, msg: Box<AgentMessage> },
    /// Closes channel `ch` (the host goes away).
    Detach { ch: u32 },
}

/// Control plane to client.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum MuxDown {
    /// A protocol v1 message for channel `ch`'s host.
    Msg { ch: u32, msg: ServerMessage },
    /// Channel `ch` is closed (refused, replaced, or the session ended).
    Closed { ch: u32, reason: String },
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
}
