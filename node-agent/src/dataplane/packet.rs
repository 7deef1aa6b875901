//! Decoding of the packets the kernel queues: the IP and TCP headers of a
//! SYN, nothing more.
//!
//! The bytes come from the network, so the decoder treats them as hostile:
//! every length is checked before it is used, every failure is a
//! [`PacketError`] that says what was wrong and where, and no input makes it
//! panic (a property test feeds it random and mutated packets). It never
//! allocates. It mirrors the kernel rule that queued the packet: iptables'
//! `--syn` means SYN set and ACK, RST and FIN clear, and only such a segment
//! decodes as a [`Syn`].

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// IP protocol number of TCP.
const TCP: u8 = 6;
/// Length of an IPv6 fixed header.
const IPV6_HEADER: usize = 40;
/// Length of a TCP header without options.
const TCP_HEADER: usize = 20;
/// Most IPv6 extension headers the decoder walks before giving up.
const MAX_EXTENSION_HEADERS: usize = 8;

const TCP_FIN: u8 = 0x01;
const TCP_SYN: u8 = 0x02;
const TCP_RST: u8 = 0x04;
const TCP_ACK: u8 = 0x10;

/// The opening segment of a TCP connection: who connects to whom.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Syn {
    /// The address of the side that connects (the client).
    pub source: IpAddr,
    /// The address connected to (the server).
    pub destination: IpAddr,
    /// The client's port.
    pub source_port: u16,
    /// The server's port.
    pub destination_port: u16,
    /// Index of the interface the SYN came in on (the bridge port for
    /// bridged packets), as the queue reports it; 0 when unknown or sent by
    /// the host itself. [`decode_syn`] leaves it 0: the bytes do not say.
    pub in_interface: u32,
}

/// Which header a [`PacketError`] is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layer {
    /// The IPv4 header.
    Ipv4,
    /// The IPv6 fixed header.
    Ipv6,
    /// An IPv6 extension header.
    Ipv6Extension,
    /// The TCP header.
    Tcp,
}

impl std::fmt::Display for Layer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Layer::Ipv4 => "IPv4 header",
            Layer::Ipv6 => "IPv6 header",
            Layer::Ipv6Extension => "IPv6 extension header",
            Layer::Tcp => "TCP header",
        })
    }
}

/// Why a queued packet is not a decodable TCP SYN.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PacketError {
    /// The packet has no bytes at all.
    #[error("empty packet")]
    Empty,
    /// The IP version nibble is neither 4 nor 6.
    #[error("IP version {0} is neither 4 nor 6")]
    UnknownVersion(u8),
    /// A header ends beyond the bytes received.
    #[error("{layer} truncated at byte {offset}: needs {needed} bytes, {available} present")]
    Truncated {
        /// The header that is cut short.
        layer: Layer,
        /// Where that header starts in the packet.
        offset: usize,
        /// How many bytes it needs.
        needed: usize,
        /// How many bytes there are from `offset` on.
        available: usize,
    },
    /// A header's own length field is impossible (IPv4 IHL below 5, TCP data
    /// offset below 5).
    #[error("{layer} at byte {offset} declares an impossible length of {declared} bytes")]
    BadHeaderLength {
        /// The header with the bad length field.
        layer: Layer,
        /// Where that header starts in the packet.
        offset: usize,
        /// The length the field declares, in bytes.
        declared: usize,
    },
    /// A non-first IP fragment: it carries no TCP header.
    #[error("non-first IP fragment (offset {offset_bytes} bytes) carries no TCP header")]
    Fragment {
        /// The fragment's offset in the original datagram, in bytes.
        offset_bytes: usize,
    },
    /// The transport protocol is not TCP (IPv6: the first header that is
    /// not an extension header walked by the decoder).
    #[error("transport protocol {0} is not TCP")]
    NotTcp(u8),
    /// More IPv6 extension headers than the decoder walks.
    #[error("more than {MAX_EXTENSION_HEADERS} IPv6 extension headers")]
    TooManyExtensionHeaders,
    /// A TCP segment that is not a connection opening (SYN set, ACK, RST
    /// and FIN clear), e.g. a SYN-ACK.
    #[error("TCP flags {flags:#04x} are not a SYN without ACK, RST and FIN")]
    NotSyn {
        /// The TCP flags byte.
        flags: u8,
    },
}

impl PacketError {
    /// A short, stable name of the error's kind, for metric labels and logs.
    pub fn kind(&self) -> &'static str {
        match self {
            PacketError::Empty => "empty",
            PacketError::UnknownVersion(_) => "unknown_version",
            PacketError::Truncated { .. } => "truncated",
            PacketError::BadHeaderLength { .. } => "bad_header_length",
            PacketError::Fragment { .. } => "fragment",
            PacketError::NotTcp(_) => "not_tcp",
            PacketError::TooManyExtensionHeaders => "too_many_extension_headers",
            PacketError::NotSyn { .. } => "not_syn",
        }
    }
}

/// `packet[offset..offset + needed]`, or the error saying it is cut short.
fn slice(packet: &[u8], layer: Layer, offset: usize, needed: usize) -> Result<&[u8], PacketError> {
    let available = packet.len().saturating_sub(offset);
    if available < needed {
        return Err(PacketError::Truncated {
            layer,
            offset,
            needed,
            available,
        });
    }
    Ok(&packet[offset..offset + needed])
}

/// Decodes a packet as the kernel queues it (starting at the IP header)
/// into the [`Syn`] it carries.
///
/// Only the headers are read, so a packet cut by the queue's copy range
/// decodes as long as the IP header and the first 20 bytes of the TCP header
/// are present. TCP options are skipped, not checked. IPv6 hop-by-hop,
/// routing, destination-options, fragment and authentication headers are
/// walked; any other next header is [`PacketError::NotTcp`].
pub fn decode_syn(packet: &[u8]) -> Result<Syn, PacketError> {
    let first = *packet.first().ok_or(PacketError::Empty)?;
    let (source, destination, tcp_offset) = match first >> 4 {
        4 => decode_ipv4(packet)?,
        6 => decode_ipv6(packet)?,
        version => return Err(PacketError::UnknownVersion(version)),
    };
    let tcp = slice(packet, Layer::Tcp, tcp_offset, TCP_HEADER)?;
    let data_offset = usize::from(tcp[12] >> 4) * 4;
    if data_offset < TCP_HEADER {
        return Err(PacketError::BadHeaderLength {
            layer: Layer::Tcp,
            offset: tcp_offset,
            declared: data_offset,
        });
    }
    let flags = tcp[13];
    if flags & TCP_SYN == 0 || flags & (TCP_ACK | TCP_RST | TCP_FIN) != 0 {
        return Err(PacketError::NotSyn { flags });
    }
    Ok(Syn {
        source,
        destination,
        source_port: u16::from_be_bytes([tcp[0], tcp[1]]),
        destination_port: u16::from_be_bytes([tcp[2], tcp[3]]),
        in_interface: 0,
    })
}

/// Source, destination and the offset of the TCP header of an IPv4 packet.
fn decode_ipv4(packet: &[u8]) -> Result<(IpAddr, IpAddr, usize), PacketError> {
    let header = slice(packet, Layer::Ipv4, 0, 20)?;
    let header_len = usize::from(header[0] & 0x0f) * 4;
    if header_len < 20 {
        return Err(PacketError::BadHeaderLength {
            layer: Layer::Ipv4,
            offset: 0,
            declared: header_len,
        });
    }
    slice(packet, Layer::Ipv4, 0, header_len)?;
    let fragment_offset = usize::from(u16::from_be_bytes([header[6], header[7]]) & 0x1fff) * 8;
    if fragment_offset != 0 {
        return Err(PacketError::Fragment {
            offset_bytes: fragment_offset,
        });
    }
    if header[9] != TCP {
        return Err(PacketError::NotTcp(header[9]));
    }
    let source = Ipv4Addr::new(header[12], header[13], header[14], header[15]);
    let destination = Ipv4Addr::new(header[16], header[17], header[18], header[19]);
    Ok((source.into(), destination.into(), header_len))
}

/// Source, destination and the offset of the TCP header of an IPv6 packet,
/// walking its extension headers.
fn decode_ipv6(packet: &[u8]) -> Result<(IpAddr, IpAddr, usize), PacketError> {
    let header = slice(packet, Layer::Ipv6, 0, IPV6_HEADER)?;
    let mut source = [0u8; 16];
    source.copy_from_slice(&header[8..24]);
    let mut destination = [0u8; 16];
    destination.copy_from_slice(&header[24..40]);
    let mut next = header[6];
    let mut offset = IPV6_HEADER;
    for _ in 0..=MAX_EXTENSION_HEADERS {
        let length = match next {
            TCP => {
                return Ok((
                    Ipv6Addr::from(source).into(),
                    Ipv6Addr::from(destination).into(),
                    offset,
                ))
            }
            // Hop-by-hop, routing, destination options: (length + 1) * 8.
            0 | 43 | 60 => {
                let ext = slice(packet, Layer::Ipv6Extension, offset, 2)?;
                (usize::from(ext[1]) + 1) * 8
            }
            // Fragment: 8 bytes; only the first fragment carries TCP.
            44 => {
                let ext = slice(packet, Layer::Ipv6Extension, offset, 8)?;
                let fragment_offset = usize::from(u16::from_be_bytes([ext[2], ext[3]]) >> 3) * 8;
                if fragment_offset != 0 {
                    return Err(PacketError::Fragment {
                        offset_bytes: fragment_offset,
                    });
                }
                8
            }
            // Authentication header: (length + 2) * 4.
            51 => {
                let ext = slice(packet, Layer::Ipv6Extension, offset, 2)?;
                (usize::from(ext[1]) + 2) * 4
            }
            other => return Err(PacketError::NotTcp(other)),
        };
        let ext = slice(packet, Layer::Ipv6Extension, offset, length)?;
        next = ext[0];
        offset += length;
    }
    Err(PacketError::TooManyExtensionHeaders)
}

/// Builders of test packets.
#[cfg(test)]
pub(crate) mod build {
    use std::net::{Ipv4Addr, Ipv6Addr};

    /// A TCP header with the given ports and flags and `options` appended
    /// (padded to a multiple of 4 bytes).
    pub fn tcp(source_port: u16, destination_port: u16, flags: u8, options: &[u8]) -> Vec<u8> {
        let mut options = options.to_vec();
        while !options.len().is_multiple_of(4) {
            options.push(1); // NOP
        }
        let data_offset = ((20 + options.len()) / 4) as u8;
        let mut tcp = Vec::new();
        tcp.extend_from_slice(&source_port.to_be_bytes());
        tcp.extend_from_slice(&destination_port.to_be_bytes());
        tcp.extend_from_slice(&1u32.to_be_bytes()); // sequence
        tcp.extend_from_slice(&0u32.to_be_bytes()); // acknowledgement
        tcp.push(data_offset << 4);
        tcp.push(flags);
        tcp.extend_from_slice(&64240u16.to_be_bytes()); // window
        tcp.extend_from_slice(&[0, 0, 0, 0]); // checksum, urgent pointer
        tcp.extend_from_slice(&options);
        tcp
    }

    /// An IPv4 packet carrying `payload` with `protocol`, with `ip_options`
    /// (a multiple of 4 bytes) in its header.
    pub fn ipv4(source: Ipv4Addr, destination: Ipv4Addr, protocol: u8, ip_options: &[u8], payload: &[u8]) -> Vec<u8> {
        let header_len = 20 + ip_options.len();
        let total = (header_len + payload.len()) as u16;
        let mut packet = vec![0x40 | (header_len / 4) as u8, 0];
        packet.extend_from_slice(&total.to_be_bytes());
        packet.extend_from_slice(&[0, 1, 0x40, 0]); // id, don't fragment
        packet.extend_from_slice(&[64, protocol, 0, 0]); // ttl, protocol, checksum
        packet.extend_from_slice(&source.octets());
        packet.extend_from_slice(&destination.octets());
        packet.extend_from_slice(ip_options);
        packet.extend_from_slice(payload);
        packet
    }

    /// An IPv6 packet whose first next-header is `next` and whose payload
    /// (extension headers included) is `payload`.
    pub fn ipv6(source: Ipv6Addr, destination: Ipv6Addr, next: u8, payload: &[u8]) -> Vec<u8> {
        let mut packet = vec![0x60, 0, 0, 0];
        packet.extend_from_slice(&(payload.len() as u16).to_be_bytes());
        packet.push(next);
        packet.push(64);
        packet.extend_from_slice(&source.octets());
        packet.extend_from_slice(&destination.octets());
        packet.extend_from_slice(payload);
        packet
    }
}

#[cfg(test)]
mod tests {
    use super::build::{ipv4, ipv6, tcp};
    use super::*;
    use proptest::prelude::*;

    const A4: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 1);
    const B4: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 2);
    const A6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 1);
    const B6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 2);

    fn syn4() -> Vec<u8> {
        ipv4(A4, B4, TCP, &[], &tcp(40000, 80, TCP_SYN, &[]))
    }

    #[test]
    fn ipv4_syn() {
        let syn = decode_syn(&syn4()).unwrap();
        assert_eq!(
            syn,
            Syn {
                source: A4.into(),
                destination: B4.into(),
                source_port: 40000,
                destination_port: 80,
                in_interface: 0
            }
        );
    }

    #[test]
    fn ipv4_syn_with_ip_and_tcp_options() {
        // Record-route-like IP option (padded) and MSS + SACK-permitted + window scale.
        let options = [2, 4, 0x05, 0xb4, 4, 2, 3, 3, 7];
        let packet = ipv4(A4, B4, TCP, &[1, 1, 1, 0], &tcp(1234, 443, TCP_SYN, &options));
        let syn = decode_syn(&packet).unwrap();
        assert_eq!((syn.source_port, syn.destination_port), (1234, 443));
        assert_eq!(syn.destination, IpAddr::from(B4));
    }

    #[test]
    fn ipv4_syn_cut_after_tcp_base_header_still_decodes() {
        let packet = ipv4(A4, B4, TCP, &[], &tcp(1, 2, TCP_SYN, &[2, 4, 5, 0xb4]));
        assert!(decode_syn(&packet[..40]).is_ok());
    }

    #[test]
    fn syn_ack_rst_fin_and_ack_are_not_syns() {
        for flags in [TCP_SYN | TCP_ACK, TCP_ACK, TCP_SYN | TCP_RST, TCP_SYN | TCP_FIN, 0] {
            let packet = ipv4(A4, B4, TCP, &[], &tcp(1, 2, flags, &[]));
            assert_eq!(
                decode_syn(&packet),
                Err(PacketError::NotSyn { flags }),
                "flags {flags:#x}"
            );
        }
        // ECN bits with SYN are still a SYN (ECE, CWR).
        let packet = ipv4(A4, B4, TCP, &[], &tcp(1, 2, TCP_SYN | 0xc0, &[]));
        assert!(decode_syn(&packet).is_ok());
    }

    #[test]
    fn truncated_headers() {
        let packet = syn4();
        assert_eq!(decode_syn(&[]), Err(PacketError::Empty));
        assert!(matches!(
            decode_syn(&packet[..19]),
            Err(PacketError::Truncated {
                layer: Layer::Ipv4,
                offset: 0,
                needed: 20,
                available: 19
            })
        ));
        assert!(matches!(
            decode_syn(&packet[..39]),
            Err(PacketError::Truncated {
                layer: Layer::Tcp,
                offset: 20,
                needed: 20,
                available: 19
            })
        ));
        let v6 = ipv6(A6, B6, TCP, &tcp(1, 2, TCP_SYN, &[]));
        assert!(matches!(
            decode_syn(&v6[..39]),
            Err(PacketError::Truncated { layer: Layer::Ipv6, .. })
        ));
        assert!(matches!(
            decode_syn(&v6[..50]),
            Err(PacketError::Truncated { layer: Layer::Tcp, .. })
        ));
    }

    #[test]
    fn bad_ihl_and_bad_data_offset() {
        let mut packet = syn4();
        packet[0] = 0x44; // IHL 4 words = 16 bytes
        assert_eq!(
            decode_syn(&packet),
            Err(PacketError::BadHeaderLength {
                layer: Layer::Ipv4,
                offset: 0,
                declared: 16
            })
        );
        let mut packet = syn4();
        packet[0] = 0x4f; // IHL 60 bytes, longer than the packet
        assert!(matches!(
            decode_syn(&packet),
            Err(PacketError::Truncated {
                layer: Layer::Ipv4,
                needed: 60,
                ..
            })
        ));
        let mut packet = syn4();
        packet[20 + 12] = 0x40; // TCP data offset 16 bytes
        assert_eq!(
            decode_syn(&packet),
            Err(PacketError::BadHeaderLength {
                layer: Layer::Tcp,
                offset: 20,
                declared: 16
            })
        );
    }

    #[test]
    fn other_protocols_versions_and_fragments() {
        let udp = ipv4(A4, B4, 17, &[], &[0; 8]);
        assert_eq!(decode_syn(&udp), Err(PacketError::NotTcp(17)));
        let mut packet = syn4();
        packet[0] = 0x55;
        assert_eq!(decode_syn(&packet), Err(PacketError::UnknownVersion(5)));
        let mut packet = syn4();
        packet[6] = 0x20; // more fragments, offset 1 (8 bytes)
        packet[7] = 0x01;
        assert_eq!(decode_syn(&packet), Err(PacketError::Fragment { offset_bytes: 8 }));
    }

    #[test]
    fn ipv6_syn() {
        let packet = ipv6(A6, B6, TCP, &tcp(5555, 8080, TCP_SYN, &[2, 4, 5, 0xa0]));
        let syn = decode_syn(&packet).unwrap();
        assert_eq!(
            syn,
            Syn {
                source: A6.into(),
                destination: B6.into(),
                source_port: 5555,
                destination_port: 8080,
                in_interface: 0
            }
        );
    }

    #[test]
    fn ipv6_extension_headers_are_walked() {
        let segment = tcp(1, 22, TCP_SYN, &[]);
        // Hop-by-hop (8 bytes) -> destination options (16 bytes) -> fragment
        // (first fragment) -> authentication header (12 bytes) -> TCP.
        let mut payload = vec![60, 0, 1, 4, 0, 0, 0, 0];
        payload.extend_from_slice(&[44, 1, 1, 12, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
        payload.extend_from_slice(&[51, 0, 0, 1, 0, 0, 0, 7]);
        payload.extend_from_slice(&[TCP, 1, 0, 0, 0, 0, 0, 1, 0, 0, 0, 1]);
        payload.extend_from_slice(&segment);
        let syn = decode_syn(&ipv6(A6, B6, 0, &payload)).unwrap();
        assert_eq!(syn.destination_port, 22);

        // A non-first fragment carries no TCP header.
        let mut payload = vec![TCP, 0, 0, 0x08 | 1, 0, 0, 0, 9];
        payload.extend_from_slice(&segment);
        assert_eq!(
            decode_syn(&ipv6(A6, B6, 44, &payload)),
            Err(PacketError::Fragment { offset_bytes: 8 })
        );

        // ESP, UDP, no-next-header are not TCP.
        for next in [50, 17, 59] {
            assert_eq!(
                decode_syn(&ipv6(A6, B6, next, &segment)),
                Err(PacketError::NotTcp(next))
            );
        }

        // An extension header longer than the packet.
        let payload = [TCP, 200, 0, 0, 0, 0, 0, 0];
        assert!(matches!(
            decode_syn(&ipv6(A6, B6, 0, &payload)),
            Err(PacketError::Truncated {
                layer: Layer::Ipv6Extension,
                offset: 40,
                ..
            })
        ));

        // A chain of hop-by-hop headers longer than the decoder walks.
        let mut payload = Vec::new();
        for _ in 0..20 {
            payload.extend_from_slice(&[0, 0, 0, 0, 0, 0, 0, 0]);
        }
        assert_eq!(
            decode_syn(&ipv6(A6, B6, 0, &payload)),
            Err(PacketError::TooManyExtensionHeaders)
        );
    }

    #[test]
    fn error_kinds_and_messages_name_the_place() {
        let error = decode_syn(&syn4()[..30]).unwrap_err();
        assert_eq!(error.kind(), "truncated");
        assert_eq!(
            error.to_string(),
            "TCP header truncated at byte 20: needs 20 bytes, 10 present"
        );
    }

    fn valid_packets() -> impl Strategy<Value = Vec<u8>> {
        prop_oneof![
            Just(syn4()),
            Just(ipv4(A4, B4, TCP, &[1, 1, 1, 0], &tcp(7, 8, TCP_SYN, &[2, 4, 5, 0xb4]))),
            Just(ipv6(A6, B6, TCP, &tcp(5555, 8080, TCP_SYN, &[]))),
            Just(ipv6(A6, B6, 0, &{
                let mut payload = vec![TCP, 0, 0, 0, 0, 0, 0, 0];
                payload.extend_from_slice(&tcp(9, 10, TCP_SYN, &[]));
                payload
            })),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(4096))]

        #[test]
        fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = decode_syn(&bytes);
        }

        #[test]
        fn random_bytes_after_a_valid_version_nibble_never_panic(
            version in prop_oneof![Just(0x45u8), Just(0x4fu8), Just(0x60u8)],
            bytes in proptest::collection::vec(any::<u8>(), 0..200),
        ) {
            let mut packet = vec![version];
            packet.extend_from_slice(&bytes);
            let _ = decode_syn(&packet);
        }

        #[test]
        fn mutated_valid_packets_never_panic(
            packet in valid_packets(),
            flips in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..8),
            cut in any::<prop::sample::Index>(),
        ) {
            let mut packet = packet;
            for (index, value) in flips {
                let at = index.index(packet.len());
                packet[at] = value;
            }
            let cut = cut.index(packet.len() + 1);
            let _ = decode_syn(&packet[..cut]);
        }

        #[test]
        fn every_prefix_of_a_valid_packet_is_an_error_or_the_same_syn(packet in valid_packets()) {
            let full = decode_syn(&packet).unwrap();
            for cut in 0..packet.len() {
                if let Ok(syn) = decode_syn(&packet[..cut]) {
                    prop_assert_eq!(syn, full);
                }
            }
        }
    }
}
