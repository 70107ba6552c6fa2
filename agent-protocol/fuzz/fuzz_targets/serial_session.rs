//! The host -> guest session framing of the agent's serial port: the host's
//! escaping (`client::escape_into`) and the guest's deframer
//! (`capsule_agent::transport::deframe`), with the HELLO handshake.
//!
//! Two inputs at once: raw bytes (junk, stale half frames, forged HELLOs),
//! fed in arbitrary chunks, must never panic and every session the deframer
//! starts must carry a hex nonce; and a well-formed stream must come out as
//! exactly the payloads after the last HELLO, whatever the chunking: what a
//! dead client left (its HELLO and an escaped frame cut anywhere, even
//! between `ff` and `00`), junk without 0xff, then a HELLO and escaped
//! payloads, optionally a second client's HELLO between two of them.
//! (Junk with 0xff could forge a HELLO, or end in a partial HELLO that eats
//! the real HELLO as its nonce: the host re-sends HELLO every second, so
//! that costs a second, not a session.)
#![no_main]

use arbitrary::Arbitrary;
use capsule_agent::transport::deframe::{Deframer, Event};
use capsule_agent_protocol::client::{escape_into, ESCAPE, ESCAPED_ESCAPE, HELLO_MAGIC, NONCE_LEN};
use libfuzzer_sys::fuzz_target;

#[derive(Debug, Arbitrary)]
struct Input {
    raw: Vec<u8>,
    /// A dead client: nonce seed, payload, where its stream was cut.
    old: Option<([u8; NONCE_LEN], Vec<u8>, u16)>,
    junk: Vec<u8>,
    nonce: [u8; NONCE_LEN],
    payloads: Vec<Vec<u8>>,
    /// A second client takes over after this many payloads.
    takeover: Option<(u8, [u8; NONCE_LEN])>,
    chunks: Vec<u8>,
}

fn hex_nonce(seed: &[u8; NONCE_LEN]) -> [u8; NONCE_LEN] {
    seed.map(|b| b"0123456789abcdef"[usize::from(b % 16)])
}

/// `seed`'s nonce, made different from `other`.
fn distinct(seed: &[u8; NONCE_LEN], other: &[u8; NONCE_LEN]) -> [u8; NONCE_LEN] {
    let mut n = hex_nonce(seed);
    if n == *other {
        n[0] = if n[0] == b'0' { b'1' } else { b'0' };
    }
    n
}

fn hello(nonce: &[u8; NONCE_LEN]) -> Vec<u8> {
    let mut v = HELLO_MAGIC.to_vec();
    v.extend_from_slice(nonce);
    v
}

/// Feeds `input` in chunks of the given sizes (cycled), collecting events
/// with adjacent data merged.
fn feed(d: &mut Deframer, input: &[u8], chunks: &[u8]) -> Vec<Event> {
    let mut out: Vec<Event> = Vec::new();
    let mut pos = 0;
    let mut i = 0;
    while pos < input.len() {
        let n = chunks
            .get(i % chunks.len().max(1))
            .map_or(input.len(), |&c| usize::from(c).max(1));
        i += 1;
        let end = (pos + n).min(input.len());
        for e in d.feed(&input[pos..end]) {
            if let Event::Session(n) = &e {
                assert!(n.iter().all(u8::is_ascii_hexdigit), "{n:?}");
            }
            match (out.last_mut(), e) {
                (Some(Event::Data(a)), Event::Data(b)) => a.extend(b),
                (_, e) => out.push(e),
            }
        }
        pos = end;
    }
    out
}

fuzz_target!(|input: Input| {
    // Raw bytes: no panic, sane events.
    let mut d = Deframer::new();
    let ev = feed(&mut d, &input.raw, &input.chunks);
    for e in &ev {
        if let Event::Data(b) = e {
            assert!(!b.is_empty());
        }
    }
    d.disconnect();
    assert!(!d.in_session());

    // The escaping never produces a byte pair the deframer would read as a
    // HELLO or garbage.
    let mut escaped = Vec::new();
    for p in &input.payloads {
        escape_into(p, &mut escaped);
    }
    for w in escaped.windows(2) {
        if w[0] == ESCAPE {
            assert_eq!(w[1], ESCAPED_ESCAPE);
        }
    }

    // A well-formed stream: junk, HELLO, escaped payloads (a second client
    // may take over mid-way, even inside a frame).
    let first = hex_nonce(&input.nonce);
    let mut stream = Vec::new();
    if let Some((seed, payload, cut)) = &input.old {
        let mut old = hello(&distinct(seed, &first));
        escape_into(payload, &mut old);
        old.truncate(
            old.len()
                .min(NONCE_LEN + HELLO_MAGIC.len() + usize::from(*cut)),
        );
        stream.extend(old);
    }
    stream.extend(input.junk.iter().filter(|&&b| b != ESCAPE));
    stream.extend(hello(&first));
    let mut last_nonce = first;
    let mut expect: Vec<u8> = Vec::new();
    for (i, p) in input.payloads.iter().enumerate() {
        if let Some((at, seed)) = &input.takeover {
            if usize::from(*at) == i {
                let second = distinct(seed, &last_nonce);
                stream.extend(hello(&second));
                expect.clear();
                last_nonce = second;
            }
        }
        escape_into(p, &mut stream);
        expect.extend(p);
    }
    let mut d = Deframer::new();
    let ev = feed(&mut d, &stream, &input.chunks);
    let pos = ev
        .iter()
        .rposition(|e| *e == Event::Session(last_nonce))
        .unwrap_or_else(|| panic!("no session for the last HELLO: {ev:?}"));
    let data: Vec<u8> = ev[pos + 1..]
        .iter()
        .flat_map(|e| match e {
            Event::Data(d) => d.clone(),
            other => panic!("{other:?} after the last HELLO"),
        })
        .collect();
    assert_eq!(data, expect);
    assert!(d.in_session());
});
