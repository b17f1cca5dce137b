//! Where the client's WebSocket frames begin and end, followed as their bytes
//! pass from the connection to tungstenite, so that the [`Socket`] knows when
//! tungstenite holds none of them and its WebSocket may be replaced.
//!
//! Why: tungstenite reads each frame into one buffer that it first grows to
//! the length the frame announces, and it keeps that allocation for as long
//! as the WebSocket lives (its write buffer too keeps the largest size it
//! grew to). After one frame near the 1 MiB hard cap (which the protocol
//! answers with `too_large`, the connection staying open), an idle connection
//! would hold ~1 MiB for life, and N connections N MiB; its configuration
//! cannot prevent it. The only way to give the memory back is a new WebSocket
//! over the same connection, and that loses nothing only when tungstenite
//! holds no byte of the client's: no frame it has not returned as a message,
//! no part of a frame, no part of a fragmented message. This reader knows
//! when that is ([`FrameBounds::renewable`]), and makes sure the moment
//! comes: once a renewal is wanted (from a large frame's header on, or when
//! the socket asks) until it happens, it hands tungstenite no byte beyond the
//! end of the frame being read, so that tungstenite is left with nothing when
//! it returns the message the frame ends (a client that then goes quiet, or
//! sends half a frame, cannot delay it).
//!
//! The headers are parsed by tungstenite's own parser; the payloads are only
//! counted. Reads are as large as tungstenite asks for (up to [`LARGE`]),
//! except that they stop at frame ends while a renewal is wanted.
//!
//! [`Socket`]: super::Socket

use std::io::{self, Cursor};
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tungstenite::protocol::frame::coding::{Data, OpCode};
use tungstenite::protocol::frame::FrameHeader;

/// A buffer that grew beyond this is worth renewing (the read buffer starts
/// at 2 KiB; one this large costs an idle connection a few times its usual
/// ~6 KiB): after a frame longer than this, or a write of more.
pub const LARGE: usize = 16 * 1024;

/// The longest frame header: 2 bytes, a 64-bit length, a 4-byte mask.
const MAX_HEADER: usize = 14;

/// An IO that follows the frames its reads carry (see the module doc).
pub struct FrameBounds<T> {
    inner: T,
    at: Position,
    /// Inside a fragmented data message: its first frame (without FIN) has
    /// been passed on, its final continuation has not.
    fragmented: bool,
    /// Frames passed on that end a message (control frames, data frames with
    /// FIN) which tungstenite has not returned yet: it returns one message
    /// for each, in order.
    unreturned: usize,
    /// A renewal is wanted (a large frame came, or the socket asked): reads
    /// stop at frame ends until it happens.
    renewal: bool,
    /// The bytes are not WebSocket frames (tungstenite fails the connection
    /// on them): they are passed on as they come, and no renewal happens.
    lost: bool,
}

/// Where the next byte falls.
enum Position {
    /// In a frame header, of which `have` bytes are in `bytes`.
    Header {
        bytes: [u8; MAX_HEADER],
        have: usize,
    },
    /// In a payload, `left` bytes before its end.
    Payload { left: u64, ends_message: bool },
}

const FRAME_START: Position = Position::Header {
    bytes: [0; MAX_HEADER],
    have: 0,
};

impl<T> FrameBounds<T> {
    pub fn new(inner: T) -> Self {
        FrameBounds {
            inner,
            at: FRAME_START,
            fragmented: false,
            unreturned: 0,
            renewal: false,
            lost: false,
        }
    }

    /// tungstenite returned a message (call once per message it returns).
    pub fn returned(&mut self) {
        self.unreturned = self.unreturned.saturating_sub(1);
    }

    /// A renewal is wanted, and tungstenite holds no byte of the client's:
    /// a new WebSocket over this IO would lose nothing it has read.
    pub fn renewable(&self) -> bool {
        self.renewal
            && !self.lost
            && !self.fragmented
            && self.unreturned == 0
            && matches!(self.at, Position::Header { have: 0, .. })
    }

    /// A renewal is wanted, for the write buffer's sake.
    pub fn want_renewal(&mut self) {
        self.renewal = true;
    }

    /// The WebSocket was renewed: reads need not stop at frame ends anymore.
    pub fn renewed(&mut self) {
        self.renewal = false;
    }

    /// How many bytes the next read may carry.
    fn read_limit(&self) -> usize {
        if self.lost {
            return usize::MAX;
        }
        if !self.renewal {
            // No read may hold a large frame's header and its whole payload,
            // so the read that ends a large frame always stops at its end.
            return LARGE;
        }
        match &self.at {
            Position::Header { bytes, have } => header_len(&bytes[..*have]) - have,
            Position::Payload { left, .. } => usize::try_from(*left).unwrap_or(usize::MAX),
        }
    }

    /// Follows the frames in `read`, the bytes just passed on.
    fn follow(&mut self, mut read: &[u8]) {
        while !read.is_empty() && !self.lost {
            match &mut self.at {
                Position::Payload { left, ends_message } => {
                    let n = read.len().min(usize::try_from(*left).unwrap_or(usize::MAX));
                    *left -= n as u64;
                    read = &read[n..];
                    if *left == 0 {
                        let ends_message = *ends_message;
                        self.frame_ended(ends_message);
                    }
                }
                Position::Header { bytes, have } => {
                    let need = header_len(&bytes[..*have]);
                    let n = read.len().min(need - *have);
                    bytes[*have..*have + n].copy_from_slice(&read[..n]);
                    *have += n;
                    read = &read[n..];
                    // Two bytes in, the header may turn out longer.
                    if *have == header_len(&bytes[..*have]) {
                        let header = *bytes;
                        let len = *have;
                        self.header_read(&header[..len]);
                    }
                }
            }
        }
    }

    fn header_read(&mut self, header: &[u8]) {
        let Ok(Some((header, len))) = FrameHeader::parse(&mut Cursor::new(header)) else {
            self.lost = true;
            return;
        };
        let ends_message = match header.opcode {
            OpCode::Control(_) => true,
            OpCode::Data(data) => {
                self.fragmented = match data {
                    Data::Continue => self.fragmented && !header.is_final,
                    _ => !header.is_final,
                };
                header.is_final
            }
        };
        if len > LARGE as u64 {
            self.renewal = true;
        }
        self.at = Position::Payload {
            left: len,
            ends_message,
        };
        if len == 0 {
            self.frame_ended(ends_message);
        }
    }

    fn frame_ended(&mut self, ends_message: bool) {
        if ends_message {
            self.unreturned += 1;
        }
        self.at = FRAME_START;
    }
}

/// The length of the header that starts with `start` (2 bytes until the
/// second byte says more: a 16- or 64-bit length, a mask).
fn header_len(start: &[u8]) -> usize {
    let Some(&second) = start.get(1) else {
        return 2;
    };
    let length = match second & 0x7f {
        126 => 2,
        127 => 8,
        _ => 0,
    };
    let mask = if second & 0x80 != 0 { 4 } else { 0 };
    2 + length + mask
}

impl<T: AsyncRead + Unpin> AsyncRead for FrameBounds<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let limit = this.read_limit().min(buf.remaining());
        let mut window = ReadBuf::new(buf.initialize_unfilled_to(limit));
        ready!(Pin::new(&mut this.inner).poll_read(cx, &mut window))?;
        let n = window.filled().len();
        this.follow(window.filled());
        buf.advance(n);
        Poll::Ready(Ok(()))
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for FrameBounds<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A masked client frame: `first` byte (FIN and opcode), `len` payload bytes.
    fn frame(first: u8, len: usize) -> Vec<u8> {
        let mut out = vec![first];
        match len {
            0..=125 => out.push(0x80 | len as u8),
            126..=0xffff => {
                out.push(0x80 | 126);
                out.extend((len as u16).to_be_bytes());
            }
            _ => {
                out.push(0x80 | 127);
                out.extend((len as u64).to_be_bytes());
            }
        }
        out.extend([1, 2, 3, 4]);
        out.extend(std::iter::repeat_n(b'x', len));
        out
    }

    const TEXT: u8 = 0x81;
    const TEXT_START: u8 = 0x01;
    const CONTINUE_END: u8 = 0x80;
    const PING: u8 = 0x89;

    #[test]
    fn header_lengths() {
        assert_eq!(header_len(&[]), 2);
        assert_eq!(header_len(&[0x81]), 2);
        assert_eq!(header_len(&[0x81, 5]), 2);
        assert_eq!(header_len(&[0x81, 0x80 | 5]), 6);
        assert_eq!(header_len(&[0x81, 0x80 | 126]), 8);
        assert_eq!(header_len(&[0x81, 0x80 | 127]), 14);
        assert_eq!(header_len(&[0x81, 127]), 10);
    }

    /// Follows `bytes` split into reads of `step` bytes.
    fn followed(bytes: &[u8], step: usize) -> FrameBounds<()> {
        let mut bounds = FrameBounds::new(());
        for read in bytes.chunks(step) {
            bounds.follow(read);
        }
        bounds
    }

    #[test]
    fn counts_the_frames_that_end_messages_however_the_reads_split() {
        let mut bytes = frame(TEXT, 3);
        bytes.extend(frame(TEXT_START, 200));
        bytes.extend(frame(PING, 0));
        bytes.extend(frame(CONTINUE_END, 70_000));
        bytes.extend(frame(TEXT, 0));
        for step in [1, 2, 5, 13, 4096, bytes.len()] {
            let mut bounds = followed(&bytes, step);
            // Four messages: the text, the ping, the fragmented text, the
            // empty text; the 70,000-byte fragment wants a renewal.
            assert_eq!(bounds.unreturned, 4, "reads of {step}");
            assert!(!bounds.renewable(), "nothing returned yet");
            for _ in 0..4 {
                bounds.returned();
            }
            assert!(bounds.renewable(), "reads of {step}");
            bounds.renewed();
            assert!(!bounds.renewable());
        }
    }

    #[test]
    fn not_renewable_inside_a_frame_or_a_fragmented_message() {
        let mut bytes = frame(TEXT, LARGE + 1);
        let whole = bytes.len();
        bytes.extend(frame(TEXT_START, 10));
        let mut bounds = followed(&bytes[..whole - 1], 4096);
        assert!(!bounds.renewable(), "inside the large frame");
        bounds.follow(&bytes[whole - 1..whole]);
        assert!(!bounds.renewable(), "its message not returned yet");
        bounds.returned();
        assert!(bounds.renewable());
        bounds.follow(&bytes[whole..whole + 1]);
        assert!(!bounds.renewable(), "inside a header");
        bounds.follow(&bytes[whole + 1..]);
        assert!(!bounds.renewable(), "inside a fragmented message");
        bounds.follow(&frame(PING, 2));
        bounds.returned();
        assert!(!bounds.renewable(), "a ping does not end the message");
        bounds.follow(&frame(CONTINUE_END, 1));
        bounds.returned();
        assert!(bounds.renewable());
    }

    #[test]
    fn reads_stop_at_frame_ends_only_while_a_renewal_is_wanted() {
        let bytes = frame(TEXT, 100);
        let mut bounds = followed(&bytes, 4096);
        assert_eq!(bounds.read_limit(), LARGE, "no renewal wanted");
        let large = frame(TEXT, LARGE + 10);
        bounds.follow(&large[..1]);
        assert_eq!(bounds.read_limit(), LARGE, "no renewal wanted yet");
        bounds.follow(&large[1..2]);
        assert_eq!(bounds.read_limit(), LARGE);
        bounds.follow(&large[2..8]);
        // The header is read: the rest of the frame, and no more.
        assert_eq!(bounds.read_limit(), LARGE + 10);
        bounds.follow(&large[8..108]);
        assert_eq!(bounds.read_limit(), LARGE - 90);
        bounds.follow(&large[108..]);
        // The next header, two bytes first.
        assert_eq!(bounds.read_limit(), 2);
        bounds.follow(&[TEXT]);
        assert_eq!(bounds.read_limit(), 1);
        bounds.follow(&[0x80 | 126]);
        assert_eq!(bounds.read_limit(), 6);
        bounds.renewed();
        assert_eq!(bounds.read_limit(), LARGE);
    }

    #[test]
    fn what_is_not_a_websocket_frame_is_passed_on_and_never_renewed() {
        // Opcode 3 is reserved.
        let mut bounds = followed(&frame(0x83, LARGE + 1), 4096);
        assert!(bounds.lost);
        bounds.follow(&frame(TEXT, 3));
        bounds.returned();
        assert!(!bounds.renewable());
        assert_eq!(bounds.read_limit(), usize::MAX);
    }
}
