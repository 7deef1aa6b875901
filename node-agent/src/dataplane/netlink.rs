//! A minimal NFQUEUE client speaking netlink directly, in safe Rust.
//!
//! Why not the `nfq` crate: `nfq` 0.2 keeps its socket private, so it can set
//! neither a receive buffer nor a receive timeout (a thread blocked in its
//! `recv` cannot be stopped until a packet arrives), it has no batched
//! verdicts, and it `assert!`s on netlink it does not expect. Its wire format
//! is small and stable (`linux/netfilter/nfnetlink_queue.h`), so this module
//! implements the part the agent needs on top of `nix`'s safe socket calls:
//! bind a queue, configure copy range, queue length and flags, receive
//! packets, and send many verdicts in one `send`. Like `nfq` it keeps
//! libnetfilter_queue (GPL) out of the agent. Every length from the kernel
//! is checked; a malformed message is an error, never a panic.

use std::io;
use std::os::fd::{AsRawFd as _, OwnedFd};
use std::time::Duration;

use nix::errno::Errno;
use nix::sys::socket::{self, sockopt, AddressFamily, MsgFlags, NetlinkAddr, SockFlag, SockProtocol, SockType};
use nix::sys::time::{TimeVal, TimeValLike as _};

const NLMSG_HEADER: usize = 16;
const NFGEN_HEADER: usize = 4;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLMSG_MIN_TYPE: u16 = 0x10;
const NLM_F_REQUEST: u16 = 1;
const NLM_F_ACK: u16 = 4;

const NFNL_SUBSYS_QUEUE: u16 = 3;
const NFQNL_MSG_PACKET: u16 = 0;
const NFQNL_MSG_VERDICT: u16 = 1;
const NFQNL_MSG_CONFIG: u16 = 2;

const NFQA_PACKET_HDR: u16 = 1;
const NFQA_VERDICT_HDR: u16 = 2;
const NFQA_IFINDEX_INDEV: u16 = 5;
const NFQA_IFINDEX_PHYSINDEV: u16 = 7;
const NFQA_PAYLOAD: u16 = 10;

const NFQA_CFG_CMD: u16 = 1;
const NFQA_CFG_PARAMS: u16 = 2;
const NFQA_CFG_QUEUE_MAXLEN: u16 = 3;
const NFQA_CFG_MASK: u16 = 4;
const NFQA_CFG_FLAGS: u16 = 5;

const NFQNL_CFG_CMD_BIND: u8 = 1;
const NFQNL_COPY_META: u8 = 1;
const NFQNL_COPY_PACKET: u8 = 2;
/// Kernel flag: accept instead of drop when the queue is full.
const NFQA_CFG_F_FAIL_OPEN: u32 = 1;

const NF_DROP: u32 = 0;
const NF_ACCEPT: u32 = 1;

/// Bytes of netlink and nfqueue metadata around a packet's payload, with
/// room to spare (the kernel's NLMSG_GOODSIZE is one page).
const METADATA_ROOM: usize = 8192;
/// Bytes of one verdict message: netlink header, nfgenmsg, verdict attribute.
pub(crate) const VERDICT_MESSAGE: usize = NLMSG_HEADER + NFGEN_HEADER + 4 + 8;

/// One packet received from a queue: its id and the copied bytes (from the
/// IP header on, at most the copy range).
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Packet<'a> {
    /// The kernel's id of the packet within its queue, echoed in the verdict.
    pub id: u32,
    /// The interface the packet came in on: the bridge port for bridged
    /// packets (`NFQA_IFINDEX_PHYSINDEV`), else the input device; 0 for
    /// locally generated packets.
    pub in_interface: u32,
    /// The packet bytes copied to userspace.
    pub payload: &'a [u8],
}

/// What one received datagram held.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Received<'a> {
    /// A queued packet.
    Packet(Packet<'a>),
    /// Something else (an ack, a message of another type): nothing to do.
    Other,
}

/// A netlink socket bound to one NFQUEUE queue number.
#[derive(Debug)]
pub(crate) struct QueueSocket {
    fd: OwnedFd,
    queue: u16,
    sequence: u32,
    buffer: Vec<u8>,
}

fn malformed(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, format!("malformed netlink message: {what}"))
}

fn u16_at(bytes: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_ne_bytes(bytes.get(at..at + 2)?.try_into().ok()?))
}

fn u32_at(bytes: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_ne_bytes(bytes.get(at..at + 4)?.try_into().ok()?))
}

fn be_u32(bytes: &[u8]) -> Option<u32> {
    Some(u32::from_be_bytes(bytes.get(..4)?.try_into().ok()?))
}

fn align4(len: usize) -> usize {
    (len + 3) & !3
}

/// Appends a netlink header and an nfgenmsg for `message` on `queue`; returns
/// where the message starts, for [`finish`].
fn begin(out: &mut Vec<u8>, message: u16, flags: u16, sequence: u32, queue: u16) -> usize {
    let start = out.len();
    out.extend_from_slice(&0u32.to_ne_bytes()); // length, set by `finish`
    out.extend_from_slice(&((NFNL_SUBSYS_QUEUE << 8) | message).to_ne_bytes());
    out.extend_from_slice(&(NLM_F_REQUEST | flags).to_ne_bytes());
    out.extend_from_slice(&sequence.to_ne_bytes());
    out.extend_from_slice(&0u32.to_ne_bytes()); // port id: the kernel
    out.push(0); // AF_UNSPEC
    out.push(0); // NFNETLINK_V0
    out.extend_from_slice(&queue.to_be_bytes());
    start
}

/// Appends one attribute (padded to 4 bytes).
fn attribute(out: &mut Vec<u8>, kind: u16, value: &[u8]) {
    let len = 4 + value.len();
    out.extend_from_slice(&(len as u16).to_ne_bytes());
    out.extend_from_slice(&kind.to_ne_bytes());
    out.extend_from_slice(value);
    out.resize(out.len() + align4(len) - len, 0);
}

/// Appends the flag attributes that set (or clear) `NFQA_CFG_F_FAIL_OPEN`
/// and leave every other flag alone.
fn fail_open_flags(out: &mut Vec<u8>, fail_open_when_full: bool) {
    let flags = if fail_open_when_full { NFQA_CFG_F_FAIL_OPEN } else { 0 };
    attribute(out, NFQA_CFG_FLAGS, &flags.to_be_bytes());
    attribute(out, NFQA_CFG_MASK, &NFQA_CFG_F_FAIL_OPEN.to_be_bytes());
}

/// Writes the length of the message that starts at `start`.
fn finish(out: &mut [u8], start: usize) {
    let len = (out.len() - start) as u32;
    out[start..start + 4].copy_from_slice(&len.to_ne_bytes());
}

/// Appends a verdict for packet `id` of `queue`.
pub(crate) fn push_verdict(out: &mut Vec<u8>, queue: u16, id: u32, accept: bool) {
    let start = begin(out, NFQNL_MSG_VERDICT, 0, 0, queue);
    let mut header = [0u8; 8];
    header[..4].copy_from_slice(&(if accept { NF_ACCEPT } else { NF_DROP }).to_be_bytes());
    header[4..].copy_from_slice(&id.to_be_bytes());
    attribute(out, NFQA_VERDICT_HDR, &header);
    finish(out, start);
}

/// Parses one datagram from the kernel. An error message with a non-zero
/// code is returned as that error.
pub(crate) fn parse(datagram: &[u8]) -> io::Result<Received<'_>> {
    let len = u32_at(datagram, 0).ok_or_else(|| malformed("shorter than a netlink header"))? as usize;
    if len < NLMSG_HEADER || len > datagram.len() {
        return Err(malformed("netlink length outside the datagram"));
    }
    let message = &datagram[..len];
    let kind = u16_at(message, 4).ok_or_else(|| malformed("no type"))?;
    match kind {
        NLMSG_ERROR => {
            let code = u32_at(message, NLMSG_HEADER).ok_or_else(|| malformed("error message without code"))? as i32;
            if code == 0 {
                Ok(Received::Other)
            } else {
                Err(io::Error::from_raw_os_error(code.saturating_abs()))
            }
        }
        NLMSG_DONE => Ok(Received::Other),
        kind if kind < NLMSG_MIN_TYPE || kind != ((NFNL_SUBSYS_QUEUE << 8) | NFQNL_MSG_PACKET) => Ok(Received::Other),
        _ => {
            let mut at = NLMSG_HEADER + NFGEN_HEADER;
            let mut id = None;
            let mut payload: &[u8] = &[];
            let (mut indev, mut physindev) = (0, 0);
            while at + 4 <= message.len() {
                let attr_len = usize::from(u16_at(message, at).ok_or_else(|| malformed("attribute header"))?);
                let attr_kind = u16_at(message, at + 2).ok_or_else(|| malformed("attribute header"))? & 0x3fff;
                if attr_len < 4 || at + attr_len > message.len() {
                    return Err(malformed("attribute length outside the message"));
                }
                let value = &message[at + 4..at + attr_len];
                match attr_kind {
                    NFQA_PACKET_HDR => {
                        let raw = value.get(..4).ok_or_else(|| malformed("short packet header"))?;
                        id = Some(u32::from_be_bytes([raw[0], raw[1], raw[2], raw[3]]));
                    }
                    NFQA_PAYLOAD => payload = value,
                    NFQA_IFINDEX_INDEV => indev = be_u32(value).ok_or_else(|| malformed("short input device"))?,
                    NFQA_IFINDEX_PHYSINDEV => {
                        physindev = be_u32(value).ok_or_else(|| malformed("short physical input device"))?;
                    }
                    _ => {}
                }
                at += align4(attr_len);
            }
            let id = id.ok_or_else(|| malformed("packet without NFQA_PACKET_HDR"))?;
            let in_interface = if physindev != 0 { physindev } else { indev };
            Ok(Received::Packet(Packet {
                id,
                in_interface,
                payload,
            }))
        }
    }
}

impl QueueSocket {
    /// Opens a netlink socket and binds queue `queue` with the given copy
    /// range, maximum queue length and kernel fail-open flag. Fails with
    /// "resource busy" if another socket already holds the queue.
    pub(crate) fn bind(
        queue: u16,
        copy_range: u16,
        max_len: u32,
        fail_open_when_full: bool,
    ) -> io::Result<QueueSocket> {
        let fd = socket::socket(
            AddressFamily::Netlink,
            SockType::Raw,
            SockFlag::SOCK_CLOEXEC,
            SockProtocol::NetlinkNetFilter,
        )?;
        socket::bind(fd.as_raw_fd(), &NetlinkAddr::new(0, 0))?;
        let mut queue_socket = QueueSocket {
            fd,
            queue,
            sequence: 0,
            buffer: vec![0; METADATA_ROOM + usize::from(copy_range)],
        };
        queue_socket.configure(|out| attribute(out, NFQA_CFG_CMD, &[NFQNL_CFG_CMD_BIND, 0, 0, 0]))?;
        let mut params = [0u8; 5];
        params[..4].copy_from_slice(&u32::from(copy_range).to_be_bytes());
        params[4] = if copy_range == 0 {
            NFQNL_COPY_META
        } else {
            NFQNL_COPY_PACKET
        };
        queue_socket.configure(|out| attribute(out, NFQA_CFG_PARAMS, &params))?;
        queue_socket.configure(|out| attribute(out, NFQA_CFG_QUEUE_MAXLEN, &max_len.to_be_bytes()))?;
        queue_socket.configure(|out| fail_open_flags(out, fail_open_when_full))?;
        Ok(queue_socket)
    }

    /// Sets or clears the kernel's fail-open flag (accept instead of drop
    /// when the queue is full) on the bound queue, without waiting: the
    /// kernel answers only if it refuses, and that answer arrives as an
    /// error from a later [`QueueSocket::receive`]. For the verdict thread,
    /// which must not wait on anything but packets.
    pub(crate) fn send_fail_open(&mut self, fail_open_when_full: bool) -> io::Result<()> {
        self.sequence = self.sequence.wrapping_add(1);
        let mut out = Vec::with_capacity(64);
        let start = begin(&mut out, NFQNL_MSG_CONFIG, 0, self.sequence, self.queue);
        fail_open_flags(&mut out, fail_open_when_full);
        finish(&mut out, start);
        socket::send(self.fd.as_raw_fd(), &out, MsgFlags::empty())?;
        Ok(())
    }

    /// Sends one config message and waits for its acknowledgement.
    fn configure(&mut self, attributes: impl FnOnce(&mut Vec<u8>)) -> io::Result<()> {
        self.sequence = self.sequence.wrapping_add(1);
        let mut out = Vec::with_capacity(64);
        let start = begin(&mut out, NFQNL_MSG_CONFIG, NLM_F_ACK, self.sequence, self.queue);
        attributes(&mut out);
        finish(&mut out, start);
        socket::send(self.fd.as_raw_fd(), &out, MsgFlags::empty())?;
        loop {
            let len = socket::recv(self.fd.as_raw_fd(), &mut self.buffer, MsgFlags::empty())?;
            let datagram = &self.buffer[..len];
            let kind = u16_at(datagram, 4).ok_or_else(|| malformed("shorter than a netlink header"))?;
            let sequence = u32_at(datagram, 8).ok_or_else(|| malformed("shorter than a netlink header"))?;
            if kind == NLMSG_ERROR && sequence == self.sequence {
                return parse(datagram).map(drop);
            }
        }
    }

    /// The queue number this socket is bound to.
    pub(crate) fn queue(&self) -> u16 {
        self.queue
    }

    /// Sets the socket's receive buffer; as root beyond `net.core.rmem_max`
    /// (`SO_RCVBUFFORCE`), otherwise up to it. Returns the size the kernel
    /// reports (it doubles the request for its own bookkeeping).
    pub(crate) fn set_receive_buffer(&self, bytes: usize) -> io::Result<usize> {
        if socket::setsockopt(&self.fd, sockopt::RcvBufForce, &bytes).is_err() {
            socket::setsockopt(&self.fd, sockopt::RcvBuf, &bytes)?;
        }
        Ok(socket::getsockopt(&self.fd, sockopt::RcvBuf)?)
    }

    /// Makes a blocking receive give up after `timeout` (so a thread can
    /// notice that it should stop).
    pub(crate) fn set_receive_timeout(&self, timeout: Duration) -> io::Result<()> {
        let value = TimeVal::microseconds(timeout.as_micros().min(i64::MAX as u128) as i64);
        Ok(socket::setsockopt(&self.fd, sockopt::ReceiveTimeout, &value)?)
    }

    /// Receives one datagram. `Ok(None)`: nothing arrived (timeout, or
    /// nothing waiting when `wait` is false).
    pub(crate) fn receive(&mut self, wait: bool) -> io::Result<Option<Received<'_>>> {
        let flags = if wait {
            MsgFlags::empty()
        } else {
            MsgFlags::MSG_DONTWAIT
        };
        match socket::recv(self.fd.as_raw_fd(), &mut self.buffer, flags) {
            Ok(len) => parse(&self.buffer[..len]).map(Some),
            Err(Errno::EAGAIN | Errno::EINTR) => Ok(None),
            Err(errno) => Err(errno.into()),
        }
    }

    /// Sends verdict messages built with [`push_verdict`] in one call.
    pub(crate) fn send(&self, messages: &[u8]) -> io::Result<()> {
        if !messages.is_empty() {
            socket::send(self.fd.as_raw_fd(), messages, MsgFlags::empty())?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// A packet message as the kernel sends it.
    fn packet_message(id: u32, payload: &[u8]) -> Vec<u8> {
        packet_message_from(id, payload, None)
    }

    /// A packet message with input device 3 and, if given, a bridge port.
    fn packet_message_from(id: u32, payload: &[u8], physindev: Option<u32>) -> Vec<u8> {
        let mut out = Vec::new();
        let start = begin(&mut out, NFQNL_MSG_PACKET, 0, 0, 7);
        let mut header = id.to_be_bytes().to_vec();
        header.extend_from_slice(&[0x08, 0x00, 1]);
        attribute(&mut out, NFQA_PACKET_HDR, &header);
        attribute(&mut out, NFQA_IFINDEX_INDEV, &3u32.to_be_bytes());
        if let Some(port) = physindev {
            attribute(&mut out, NFQA_IFINDEX_PHYSINDEV, &port.to_be_bytes());
        }
        attribute(&mut out, NFQA_PAYLOAD, payload);
        finish(&mut out, start);
        out
    }

    #[test]
    fn parses_a_packet_message() {
        let message = packet_message(42, &[0x45, 1, 2, 3, 4]);
        assert_eq!(
            parse(&message).unwrap(),
            Received::Packet(Packet {
                id: 42,
                in_interface: 3,
                payload: &[0x45, 1, 2, 3, 4]
            })
        );
    }

    #[test]
    fn a_bridged_packet_comes_in_on_its_bridge_port() {
        let message = packet_message_from(1, &[0x45], Some(19));
        let Received::Packet(packet) = parse(&message).unwrap() else {
            panic!("not a packet");
        };
        assert_eq!(packet.in_interface, 19);
    }

    #[test]
    fn fail_open_flags_set_and_clear_only_their_bit() {
        let mut set = Vec::new();
        fail_open_flags(&mut set, true);
        assert_eq!(
            set,
            [
                &8u16.to_ne_bytes()[..],
                &NFQA_CFG_FLAGS.to_ne_bytes(),
                &1u32.to_be_bytes(),
                &8u16.to_ne_bytes(),
                &NFQA_CFG_MASK.to_ne_bytes(),
                &1u32.to_be_bytes()
            ]
            .concat()
        );
        let mut clear = Vec::new();
        fail_open_flags(&mut clear, false);
        assert_eq!(&clear[4..8], &0u32.to_be_bytes(), "flags 0 under mask 1 clears the bit");
        assert_eq!(&clear[12..16], &1u32.to_be_bytes());
    }

    #[test]
    fn error_messages_are_errors_and_acks_are_not() {
        let mut ack = Vec::new();
        ack.extend_from_slice(&36u32.to_ne_bytes());
        ack.extend_from_slice(&NLMSG_ERROR.to_ne_bytes());
        ack.extend_from_slice(&[0; 10]);
        ack.extend_from_slice(&0i32.to_ne_bytes());
        ack.extend_from_slice(&[0; 16]);
        assert_eq!(parse(&ack).unwrap(), Received::Other);
        ack[16..20].copy_from_slice(&(-16i32).to_ne_bytes());
        assert_eq!(parse(&ack).unwrap_err().raw_os_error(), Some(16));
    }

    #[test]
    fn verdicts_are_well_formed() {
        let mut out = Vec::new();
        push_verdict(&mut out, 3, 9, true);
        push_verdict(&mut out, 3, 10, false);
        assert_eq!(out.len(), 2 * VERDICT_MESSAGE);
        assert_eq!(u32_at(&out, 0), Some(VERDICT_MESSAGE as u32));
        assert_eq!(u16_at(&out, 4), Some((NFNL_SUBSYS_QUEUE << 8) | NFQNL_MSG_VERDICT));
        assert_eq!(&out[18..20], &3u16.to_be_bytes());
        assert_eq!(&out[24..28], &NF_ACCEPT.to_be_bytes());
        assert_eq!(&out[28..32], &9u32.to_be_bytes());
        assert_eq!(&out[VERDICT_MESSAGE + 24..VERDICT_MESSAGE + 28], &NF_DROP.to_be_bytes());
    }

    #[test]
    fn malformed_messages_are_errors() {
        let message = packet_message(1, &[1, 2, 3]);
        assert!(parse(&message[..10]).is_err());
        let mut long = message.clone();
        long[0..4].copy_from_slice(&1000u32.to_ne_bytes());
        assert!(parse(&long).is_err());
        let mut bad_attr = message.clone();
        bad_attr[20..22].copy_from_slice(&500u16.to_ne_bytes());
        assert!(parse(&bad_attr).is_err());
    }

    proptest! {
        #[test]
        fn parse_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..128)) {
            let _ = parse(&bytes);
        }

        #[test]
        fn parse_of_mutated_messages_never_panics(
            flips in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..6),
        ) {
            let mut message = packet_message(5, &[0x45; 40]);
            for (index, value) in flips {
                let at = index.index(message.len());
                message[at] = value;
            }
            let _ = parse(&message);
        }
    }
}
