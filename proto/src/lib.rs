//! Wire protocol between the coordinator and its workers.
//!
//! * [`messages`]: the versioned, serde-encoded messages (bincode) of both directions.
//! * [`frame`]: length-prefixed frames with a size cap, and the connection preamble that
//!   carries the protocol version.
//! * [`join`]: the join string a volunteer pastes (`dtrain://SECRET@HOST:PORT/FINGERPRINT`).
//! * [`tls`]: QUIC endpoints over rustls: a self-signed coordinator certificate, and a
//!   worker-side verifier that pins the certificate's blake3 fingerprint.

pub mod frame;
pub mod join;
pub mod messages;
pub mod tls;

pub use frame::{read_frame, read_preamble, write_frame, write_preamble, FrameError};
pub use join::{JoinError, JoinTicket};
pub use messages::*;

/// Version of this protocol; a peer speaking another version is refused with a clear reason.
pub const PROTOCOL_VERSION: u32 = 7;

/// ALPN identifier used on every QUIC connection of this project.
pub const ALPN: &[u8] = b"dtrain";

/// QUIC application close codes, with the reason string sent alongside.
pub mod close {
    /// The run finished: a worker stops for good. (quinn also closes a connection with code 0
    /// when its last handle is dropped; the coordinator always closes explicitly.)
    pub const DONE: u32 = 0;
    /// The peer speaks another protocol version.
    pub const VERSION: u32 = 1;
    /// Wrong join secret, or a banned identity.
    pub const AUTH: u32 = 2;
    /// The peer broke the protocol (malformed frame, unexpected message, oversized frame).
    pub const PROTOCOL: u32 = 3;
    /// The coordinator has no room for more workers.
    pub const FULL: u32 = 4;
    /// A handshake step took too long.
    pub const TIMEOUT: u32 = 5;
    /// The coordinator is stopping but the run will resume: reconnect with backoff.
    pub const GOING_AWAY: u32 = 6;
}
