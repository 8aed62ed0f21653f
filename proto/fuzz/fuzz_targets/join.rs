//! Parsing an arbitrary join string never panics, and whatever parses prints back to a string
//! that parses to the same ticket.
#![no_main]

use libfuzzer_sys::fuzz_target;
use proto::JoinTicket;

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(t) = s.parse::<JoinTicket>() {
        assert_eq!(t.to_string().parse::<JoinTicket>(), Ok(t));
    }
});
