//! W3C trace context (`traceparent`) carried in NATS headers, so one saga is one trace across
//! processes: the request's trace id (or a new one) is kept in the saga state, every command and
//! event carries it, and participants copy it into their replies.
//!
//! Span ids are derived from the message id, so a republished message is byte-identical to the
//! first one (dedup and the one rule stay simple).

/// Header name (lower case, as the W3C spec writes it).
pub const TRACEPARENT: &str = "traceparent";

/// The 32-hex-digit trace id of a `traceparent` value, if it is well formed.
pub fn trace_id(traceparent: &str) -> Option<&str> {
    let mut parts = traceparent.split('-');
    let (version, trace, span, flags) =
        (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    let hex = |s: &str, n: usize| s.len() == n && s.bytes().all(|b| b.is_ascii_hexdigit());
    let ok = hex(version, 2)
        && version != "ff"
        && hex(trace, 32)
        && trace != "00000000000000000000000000000000"
        && hex(span, 16)
        && hex(flags, 2);
    ok.then_some(trace)
}

/// The 16-hex-digit parent span id of a well-formed `traceparent` value.
pub fn parent_span_id(traceparent: &str) -> Option<&str> {
    trace_id(traceparent)?;
    traceparent.split('-').nth(2)
}

/// A fresh random trace id.
pub fn new_trace_id() -> String {
    uuid::Uuid::new_v4().simple().to_string()
}

/// A span id derived from `seed` (e.g. a message id): FNV-1a, never zero.
pub fn span_id(seed: &str) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in seed.bytes() {
        h ^= b as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    format!("{:016x}", h.max(1))
}

/// `00-<trace_id>-<span_id>-01` (sampled).
pub fn traceparent(trace_id: &str, span_id: &str) -> String {
    format!("00-{trace_id}-{span_id}-01")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_builds() {
        let t = new_trace_id();
        assert_eq!(t.len(), 32);
        let tp = traceparent(&t, &span_id("o-1.0.create.1"));
        assert_eq!(trace_id(&tp), Some(t.as_str()));
        assert_eq!(
            parent_span_id(&tp),
            Some(span_id("o-1.0.create.1").as_str())
        );
        assert_eq!(parent_span_id("00-abc-00f067aa0ba902b7-01"), None);
        assert_eq!(span_id("x"), span_id("x"));
        assert_ne!(span_id("x"), span_id("y"));
        assert_eq!(
            trace_id("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
            Some("4bf92f3577b34da6a3ce929d0e0e4736")
        );
        for bad in [
            "",
            "00-abc-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "zz-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        ] {
            assert_eq!(trace_id(bad), None, "{bad}");
        }
    }
}
