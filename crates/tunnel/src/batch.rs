//! Batching of encrypted datagrams for UDP GSO.
//!
//! The kernel hands the tunnel a 64 KB TCP segment through the TUN offload;
//! it is split into MTU-sized packets and each is encrypted into one
//! contiguous buffer. Consecutive datagrams for the same endpoint that have
//! the same size (the last may be shorter) leave in one `sendmsg` with
//! `UDP_SEGMENT`: one system call and one trip down the stack for up to 64
//! datagrams, where boringtun makes one `sendto` per packet. This module is
//! the bookkeeping only (which bytes go out as which group), kept apart
//! from the sockets so that it can be tested on its own.

use std::net::SocketAddr;

/// The most payload one GSO send may carry (an IPv4 datagram's limit is
/// 65,507 bytes; stay a little under it).
pub const MAX_GSO_BYTES: usize = 65_000;

/// Datagrams that leave in one send: all `segment` bytes long except
/// perhaps the last.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Group {
    pub dest: SocketAddr,
    pub start: usize,
    pub end: usize,
    pub segment: usize,
    pub count: usize,
    /// A shorter datagram ended the group: nothing may join it.
    closed: bool,
}

/// A buffer that encrypted datagrams are written into, one after another,
/// grouped for GSO as they are committed.
pub struct SendBatch {
    buf: Vec<u8>,
    len: usize,
    slot: usize,
    max_segments: usize,
    groups: Vec<Group>,
}

impl SendBatch {
    /// `slots` datagrams of at most `slot` bytes; at most `max_segments`
    /// per group (1 turns GSO off).
    pub fn new(slots: usize, slot: usize, max_segments: usize) -> SendBatch {
        SendBatch {
            buf: vec![0; slots * slot],
            len: 0,
            slot,
            max_segments: max_segments.max(1),
            groups: Vec::new(),
        }
    }

    /// Where to write the next datagram, or `None` when the batch is full
    /// (send it first).
    pub fn slot(&mut self) -> Option<&mut [u8]> {
        let end = self.len + self.slot;
        self.buf.get_mut(self.len..end)
    }

    /// Records that `n` bytes were written at the slot, for `dest`.
    pub fn commit(&mut self, dest: SocketAddr, n: usize) {
        let n = n.min(self.slot);
        let joins = self.groups.last().is_some_and(|g| {
            !g.closed
                && g.dest == dest
                && n <= g.segment
                && g.count < self.max_segments
                && g.end - g.start + n <= MAX_GSO_BYTES
        });
        match self.groups.last_mut() {
            Some(g) if joins => {
                g.end += n;
                g.count += 1;
                g.closed = n < g.segment;
            }
            _ => self.groups.push(Group {
                dest,
                start: self.len,
                end: self.len + n,
                segment: n,
                count: 1,
                closed: false,
            }),
        }
        self.len += n;
    }

    /// The groups to send, with their bytes.
    pub fn groups(&self) -> impl Iterator<Item = (&Group, &[u8])> {
        self.groups
            .iter()
            .map(|g| (g, self.buf.get(g.start..g.end).unwrap_or(&[])))
    }

    pub fn is_empty(&self) -> bool {
        self.groups.is_empty()
    }

    pub fn clear(&mut self) {
        self.len = 0;
        self.groups.clear();
    }

    /// Changes the group limit (the socket may find GSO unsupported).
    pub fn set_max_segments(&mut self, max_segments: usize) {
        self.max_segments = max_segments.max(1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(s: &str) -> SocketAddr {
        s.parse().expect("addr")
    }

    fn push(b: &mut SendBatch, dest: &str, n: usize, fill: u8) {
        let slot = b.slot().expect("room");
        slot[..n].fill(fill);
        b.commit(addr(dest), n);
    }

    fn shape(b: &SendBatch) -> Vec<(String, usize, usize)> {
        b.groups()
            .map(|(g, bytes)| (g.dest.to_string(), g.segment, bytes.len()))
            .collect()
    }

    #[test]
    fn equal_datagrams_to_one_peer_form_one_group_and_a_short_one_ends_it() {
        let mut b = SendBatch::new(16, 1500, 64);
        for _ in 0..4 {
            push(&mut b, "10.0.0.2:1", 1452, 1);
        }
        push(&mut b, "10.0.0.2:1", 600, 2);
        push(&mut b, "10.0.0.2:1", 600, 3);
        assert_eq!(
            shape(&b),
            vec![
                ("10.0.0.2:1".into(), 1452, 4 * 1452 + 600),
                ("10.0.0.2:1".into(), 600, 600)
            ]
        );
        // The bytes are the datagrams in order, contiguous.
        let (_, first) = b.groups().next().expect("group");
        assert!(first[..4 * 1452].iter().all(|&x| x == 1));
        assert!(first[4 * 1452..].iter().all(|&x| x == 2));
    }

    #[test]
    fn another_endpoint_or_a_longer_datagram_starts_a_group() {
        let mut b = SendBatch::new(16, 1500, 64);
        push(&mut b, "10.0.0.2:1", 100, 0);
        push(&mut b, "10.0.0.3:1", 100, 0);
        push(&mut b, "10.0.0.3:1", 148, 0);
        assert_eq!(
            shape(&b),
            vec![
                ("10.0.0.2:1".into(), 100, 100),
                ("10.0.0.3:1".into(), 100, 100),
                ("10.0.0.3:1".into(), 148, 148)
            ]
        );
    }

    #[test]
    fn groups_respect_the_segment_and_byte_limits() {
        let mut b = SendBatch::new(128, 1500, 3);
        for _ in 0..7 {
            push(&mut b, "10.0.0.2:1", 1000, 0);
        }
        let counts: Vec<usize> = b.groups().map(|(g, _)| g.count).collect();
        assert_eq!(counts, vec![3, 3, 1]);

        let mut b = SendBatch::new(128, 1500, 64);
        for _ in 0..50 {
            push(&mut b, "10.0.0.2:1", 1452, 0);
        }
        for (g, bytes) in b.groups() {
            assert!(bytes.len() <= MAX_GSO_BYTES, "{g:?}");
        }
        assert_eq!(b.groups().map(|(g, _)| g.count).sum::<usize>(), 50);
    }

    #[test]
    fn a_full_batch_has_no_slot_until_cleared() {
        let mut b = SendBatch::new(2, 100, 64);
        push(&mut b, "10.0.0.2:1", 100, 0);
        push(&mut b, "10.0.0.2:1", 100, 0);
        assert!(b.slot().is_none());
        b.clear();
        assert!(b.is_empty());
        assert!(b.slot().is_some());
    }

    #[test]
    fn gso_off_sends_each_datagram_alone() {
        let mut b = SendBatch::new(8, 100, 1);
        for _ in 0..3 {
            push(&mut b, "10.0.0.2:1", 100, 0);
        }
        assert_eq!(b.groups().count(), 3);
    }
}
