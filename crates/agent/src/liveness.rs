//! Whether the agent's connection to the control plane is alive.
//!
//! A TCP connection whose packets are silently dropped (a partition, a
//! dead NAT mapping, a control plane host that lost power) looks open to
//! the side that is not writing: without a deadline the agent waited on it
//! for as long as the kernel let it (issue 30: nothing logged for a whole
//! 3-minute partition, back 22–39 s after the link healed). So every
//! connection to the control plane (a host's own WebSocket, or a
//! multiplexed one carrying many hosts) keeps:
//!
//! - a read deadline: no frame at all from the control plane (a message,
//!   its pong, its ping) for [`DEAD_AFTER`] heartbeat intervals and the
//!   connection is dead: logged, dropped, and dialled again at once;
//! - a WebSocket ping every heartbeat interval, so a healthy but quiet
//!   link always carries something back (the control plane pings too);
//! - TCP keepalive on its socket ([`keepalive`]), so the kernel also gives
//!   up on a dead peer while nothing is being written.
//!
//! The interval is the control plane's (`welcome.heartbeat_interval_s`),
//! learned from the first welcome the connection carries; until then,
//! [`DEFAULT_INTERVAL`]. One timer per connection, moved on only when it
//! fires (not per frame, and not per host of a multiplexed connection).
//!
//! A leaf: it imports nothing of the agent.

use std::pin::Pin;
use std::time::Duration;

use tokio::time::{Instant, Sleep};
use virt8ra_api::protocol::ServerMessage;

/// Heartbeat intervals without a frame from the control plane after which
/// the connection is dead.
pub const DEAD_AFTER: u32 = 3;

/// The interval assumed until a welcome says otherwise (the control
/// plane's default).
pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(5);

/// What a connection's liveness asks of it.
#[derive(Debug, PartialEq, Eq)]
pub enum Due {
    /// Send a ping.
    Ping,
    /// Nothing heard for this long: the connection is dead.
    Dead(Duration),
}

/// One connection's read deadline and ping clock.
pub struct Liveness {
    every: Duration,
    last: Instant,
    next_ping: Instant,
    timer: Pin<Box<Sleep>>,
}

impl Liveness {
    pub fn new(every: Duration) -> Liveness {
        let now = Instant::now();
        let mut l = Liveness {
            every,
            last: now,
            next_ping: now + every,
            timer: Box::pin(tokio::time::sleep_until(now + every)),
        };
        l.rearm();
        l
    }

    /// A frame arrived (cheap: the timer is not touched).
    pub fn heard(&mut self) {
        self.last = Instant::now();
    }

    /// The heartbeat interval, if `msg` is a welcome (clamped as the
    /// session clamps it).
    pub fn interval_of(msg: &ServerMessage) -> Option<Duration> {
        match msg {
            ServerMessage::Welcome {
                heartbeat_interval_s,
                ..
            } => Some(Duration::from_secs((*heartbeat_interval_s).clamp(1, 300))),
            _ => None,
        }
    }

    /// Takes the control plane's heartbeat interval; true if it changed.
    pub fn learn(&mut self, every: Duration) -> bool {
        if every == self.every {
            return false;
        }
        self.every = every;
        self.next_ping = Instant::now() + every;
        self.rearm();
        true
    }

    pub fn interval(&self) -> Duration {
        self.every
    }

    fn deadline(&self) -> Instant {
        self.last + self.every * DEAD_AFTER
    }

    fn rearm(&mut self) {
        let at = self.next_ping.min(self.deadline());
        self.timer.as_mut().reset(at);
    }

    /// Waits until a ping is due or the connection is dead. Cancel-safe:
    /// dropped before it returns, it changes nothing.
    pub async fn due(&mut self) -> Due {
        loop {
            self.timer.as_mut().await;
            let now = Instant::now();
            let silent = now.saturating_duration_since(self.last);
            if silent >= self.every * DEAD_AFTER {
                return Due::Dead(silent);
            }
            if now >= self.next_ping {
                self.next_ping = now + self.every;
                self.rearm();
                return Due::Ping;
            }
            self.rearm();
        }
    }
}

/// Sets TCP keepalive on the socket under a WebSocket to the control
/// plane: first probe after two heartbeat intervals of silence, then one
/// every interval, dead after three unanswered. Best effort (logged).
pub fn keepalive(ws: &virt8ra_tls::WebSocket, every: Duration) {
    use tokio_tungstenite::MaybeTlsStream;
    let tcp = match ws.get_ref() {
        MaybeTlsStream::Plain(s) => s,
        MaybeTlsStream::Rustls(s) => s.get_ref().0,
        _ => return,
    };
    let ka = socket2::TcpKeepalive::new()
        .with_time(every * 2)
        .with_interval(every)
        .with_retries(3);
    if let Err(e) = socket2::SockRef::from(tcp).set_tcp_keepalive(&ka) {
        tracing::debug!(error = %e, "TCP keepalive not set on the channel");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Real time (tokio's paused clock needs a feature the workspace does
    /// not build), in steps of 100 ms; each check allows 60 ms late.
    fn near(got: Duration, want: Duration) -> bool {
        got >= want && got <= want + Duration::from_millis(60)
    }

    #[tokio::test]
    async fn pings_every_interval_and_dies_after_three_silent_ones() {
        let ms = Duration::from_millis;
        let mut l = Liveness::new(ms(100));
        // Heard all along: a ping every interval, never dead.
        for _ in 0..4 {
            let t = Instant::now();
            l.heard();
            assert_eq!(l.due().await, Due::Ping);
            assert!(near(t.elapsed(), ms(100)), "{:?}", t.elapsed());
        }
        // Then silence: pings go on, dead three intervals after the last
        // frame heard, not a moment later.
        l.heard();
        let heard = Instant::now();
        let mut pings = 0;
        loop {
            match l.due().await {
                Due::Ping => pings += 1,
                Due::Dead(silent) => {
                    assert!(near(silent, ms(300)), "{silent:?}");
                    assert!(near(heard.elapsed(), ms(300)), "{:?}", heard.elapsed());
                    break;
                }
            }
        }
        assert!(pings >= 2, "{pings}");
    }

    #[tokio::test]
    async fn a_welcome_sets_the_interval() {
        let mut l = Liveness {
            every: DEFAULT_INTERVAL,
            last: Instant::now(),
            next_ping: Instant::now(),
            timer: Box::pin(tokio::time::sleep_until(Instant::now())),
        };
        let welcome = ServerMessage::Welcome {
            protocol: 3,
            host_id: "h".into(),
            heartbeat_interval_s: 1,
            site_secret: None,
        };
        let every = Liveness::interval_of(&welcome).unwrap();
        assert_eq!(every, Duration::from_secs(1));
        assert!(l.learn(every));
        assert!(!l.learn(every));
        assert_eq!(l.interval(), every);
        assert_eq!(l.deadline(), l.last + Duration::from_secs(3));
        assert_eq!(Liveness::interval_of(&ServerMessage::ReportRequest), None);
    }
}
