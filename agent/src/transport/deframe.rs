//! Session framing of the host -> guest byte stream of the serial port.
//!
//! The port is one byte stream for the guest's whole life, while host clients
//! come and go, and the guest does not always see a disconnect: when a client
//! closes and the next one connects before the guest handled the "host
//! closed" message, the driver processes both at once and a read never
//! returns EOF. Bytes of the dead client (half a ttrpc frame) then run
//! straight into the new client's bytes. So the host escapes its stream (see
//! `capsule_agent_protocol::client`): 0xff is sent as `ff 00`, and `ff 01`
//! only ever starts a HELLO (`HELLO_MAGIC` + 16 hex digits of nonce). This
//! deframer unescapes, and a HELLO anywhere (even inside a frame) starts a new
//! session: the old ttrpc connection ends with its half frame, the new one
//! starts clean. A repeated HELLO with the current nonce (the client re-sends
//! it until it sees READY) is ignored. Anything else after 0xff is garbage:
//! the session ends and bytes are dropped until the next HELLO.
use capsule_agent_protocol::client::{ESCAPE, ESCAPED_ESCAPE, HELLO_MAGIC, NONCE_LEN};

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// Unescaped bytes of the current session, in order.
    Data(Vec<u8>),
    /// A new client said HELLO with this nonce: end the old session.
    Session([u8; NONCE_LEN]),
    /// Not a valid escaped stream: end the session, wait for a HELLO.
    Garbage(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum State {
    /// Dropping bytes until a HELLO; `matched` bytes of it seen so far.
    Hunting { matched: usize },
    /// Matching the rest of a HELLO whose `ff 01` was seen in a session.
    Hello { matched: usize },
    /// HELLO seen, collecting the nonce.
    Nonce { buf: Vec<u8> },
    /// In a session; `escape`: the previous byte was 0xff.
    Session { escape: bool },
}

#[derive(Debug)]
pub struct Deframer {
    state: State,
    nonce: Option<[u8; NONCE_LEN]>,
}

impl Default for Deframer {
    fn default() -> Self {
        Self::new()
    }
}

impl Deframer {
    pub fn new() -> Self {
        Self {
            state: State::Hunting { matched: 0 },
            nonce: None,
        }
    }

    /// The host went away: whatever comes next needs a new HELLO.
    pub fn disconnect(&mut self) {
        *self = Self::new();
    }

    /// True while bytes are forwarded to a session.
    pub fn in_session(&self) -> bool {
        matches!(self.state, State::Session { .. })
    }

    pub fn feed(&mut self, input: &[u8]) -> Vec<Event> {
        let mut out = Vec::new();
        let mut data = Vec::new();
        let mut i = 0;
        while i < input.len() {
            let b = input[i];
            match &mut self.state {
                State::Hunting { matched } => {
                    if b == HELLO_MAGIC[*matched] {
                        *matched += 1;
                        if *matched == HELLO_MAGIC.len() {
                            self.state = State::Nonce {
                                buf: Vec::with_capacity(NONCE_LEN),
                            };
                        }
                    } else {
                        *matched = usize::from(b == HELLO_MAGIC[0]);
                    }
                    i += 1;
                }
                State::Hello { matched } => {
                    if b == HELLO_MAGIC[*matched] {
                        *matched += 1;
                        i += 1;
                        if *matched == HELLO_MAGIC.len() {
                            self.state = State::Nonce {
                                buf: Vec::with_capacity(NONCE_LEN),
                            };
                        }
                    } else {
                        self.garbage("0xff 0x01 not followed by a HELLO", &mut data, &mut out);
                        // Re-examine this byte as a possible HELLO start.
                    }
                }
                State::Nonce { buf } => {
                    if !b.is_ascii_hexdigit() {
                        // Checked per byte: a HELLO cut short by the next
                        // client's HELLO must not swallow that one's start.
                        self.garbage("HELLO nonce is not hex", &mut data, &mut out);
                        // Re-examine this byte as a possible HELLO start.
                        continue;
                    }
                    buf.push(b);
                    i += 1;
                    if buf.len() == NONCE_LEN {
                        let mut nonce = [0u8; NONCE_LEN];
                        nonce.copy_from_slice(buf);
                        self.state = State::Session { escape: false };
                        if self.nonce != Some(nonce) {
                            flush(&mut data, &mut out);
                            self.nonce = Some(nonce);
                            out.push(Event::Session(nonce));
                        }
                    }
                }
                State::Session { escape: false } => {
                    // Copy the run of plain bytes at once.
                    let run = input[i..]
                        .iter()
                        .position(|&c| c == ESCAPE)
                        .unwrap_or(input.len() - i);
                    data.extend_from_slice(&input[i..i + run]);
                    i += run;
                    if i < input.len() {
                        self.state = State::Session { escape: true };
                        i += 1;
                    }
                }
                State::Session { escape: true } => {
                    if b == ESCAPED_ESCAPE {
                        data.push(ESCAPE);
                        self.state = State::Session { escape: false };
                        i += 1;
                    } else if b == HELLO_MAGIC[1] {
                        self.state = State::Hello { matched: 2 };
                        i += 1;
                    } else {
                        self.garbage("0xff followed by an unknown byte", &mut data, &mut out);
                    }
                }
            }
        }
        flush(&mut data, &mut out);
        out
    }

    fn garbage(&mut self, why: &str, data: &mut Vec<u8>, out: &mut Vec<Event>) {
        flush(data, out);
        out.push(Event::Garbage(why.into()));
        self.nonce = None;
        self.state = State::Hunting { matched: 0 };
    }
}

fn flush(data: &mut Vec<u8>, out: &mut Vec<Event>) {
    if !data.is_empty() {
        out.push(Event::Data(std::mem::take(data)));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use capsule_agent_protocol::client::escape_into;
    use proptest::prelude::*;

    const N1: &[u8; 16] = b"0123456789abcdef";
    const N2: &[u8; 16] = b"fedcba9876543210";

    fn hello(n: &[u8; 16]) -> Vec<u8> {
        let mut v = HELLO_MAGIC.to_vec();
        v.extend_from_slice(n);
        v
    }

    fn esc(data: &[u8]) -> Vec<u8> {
        let mut v = Vec::new();
        escape_into(data, &mut v);
        v
    }

    #[test]
    fn a_hello_cut_short_does_not_swallow_the_next_one() {
        for cut in 0..N1.len() {
            let mut input = HELLO_MAGIC.to_vec();
            input.extend_from_slice(&N1[..cut]);
            input.extend(hello(N2));
            input.extend(esc(b"payload"));
            for chunk in [1, 3, input.len()] {
                let mut d = Deframer::new();
                let events = run(&mut d, &input, chunk);
                let sessions: Vec<&Event> = events
                    .iter()
                    .filter(|e| matches!(e, Event::Session(_)))
                    .collect();
                assert_eq!(sessions, [&Event::Session(*N2)], "cut {cut}: {events:?}");
                assert_eq!(
                    events.last(),
                    Some(&Event::Data(b"payload".to_vec())),
                    "cut {cut}"
                );
            }
        }
    }

    /// Feeds in chunks of `chunk` bytes and merges adjacent Data events.
    fn run(d: &mut Deframer, input: &[u8], chunk: usize) -> Vec<Event> {
        let mut out: Vec<Event> = Vec::new();
        for c in input.chunks(chunk.max(1)) {
            for e in d.feed(c) {
                match (out.last_mut(), e) {
                    (Some(Event::Data(a)), Event::Data(b)) => a.extend(b),
                    (_, e) => out.push(e),
                }
            }
        }
        out
    }

    #[test]
    fn junk_before_hello_is_dropped_and_data_unescaped() {
        let payload = [0u8, 1, 0xff, 0xff, 2, 0xff];
        let mut input = b"stale half frame \x00\x00\x01\xff\x00".to_vec();
        input.extend(hello(N1));
        input.extend(esc(&payload));
        for chunk in [1, 3, 7, 1000] {
            let mut d = Deframer::new();
            assert_eq!(
                run(&mut d, &input, chunk),
                vec![Event::Session(*N1), Event::Data(payload.to_vec())],
                "chunk {chunk}"
            );
            assert!(d.in_session());
        }
    }

    #[test]
    fn hello_inside_a_frame_starts_a_new_session() {
        // The old client died mid-frame and the new one connected before the
        // guest saw the disconnect: its HELLO lands inside the frame.
        let mut input = hello(N1);
        input.extend(esc(&[0, 0, 0, 50, 0, 0, 0, 1, 1, 0, 0xff, 7]));
        input.extend(hello(N1)); // a re-sent HELLO of the current client: ignored
        input.extend(esc(b"more"));
        input.extend(hello(N2));
        input.extend(esc(b"new"));
        for chunk in [1, 5, 1000] {
            let mut d = Deframer::new();
            assert_eq!(
                run(&mut d, &input, chunk),
                vec![
                    Event::Session(*N1),
                    Event::Data(vec![
                        0, 0, 0, 50, 0, 0, 0, 1, 1, 0, 0xff, 7, b'm', b'o', b'r', b'e'
                    ]),
                    Event::Session(*N2),
                    Event::Data(b"new".to_vec()),
                ]
            );
        }
    }

    #[test]
    fn garbage_and_disconnect() {
        let mut d = Deframer::new();
        let mut input = hello(N1);
        input.extend([b'a', 0xff, 0x42, b'x']);
        let ev = run(&mut d, &input, 1000);
        assert_eq!(ev[1], Event::Data(b"a".to_vec()));
        assert!(matches!(ev[2], Event::Garbage(_)));
        assert!(!d.in_session());
        // After garbage the same nonce is a new session again.
        assert_eq!(d.feed(&hello(N1)), vec![Event::Session(*N1)]);
        let mut bad = vec![0xff, 0x01, b'X'];
        bad.extend(hello(N2));
        assert_eq!(
            d.feed(&bad)[0],
            Event::Garbage("0xff 0x01 not followed by a HELLO".into())
        );
        assert!(d.in_session(), "the HELLO right after the garbage is found");
        assert!(matches!(
            d.feed(&hello(b"zzzzzzzzzzzzzzzz"))[0],
            Event::Garbage(_)
        ));
        // Half a frame, then the host goes away: nothing of it reaches the next session.
        let mut d = Deframer::new();
        d.feed(&hello(N1));
        assert_eq!(d.feed(b"0123"), vec![Event::Data(b"0123".to_vec())]);
        d.disconnect();
        let mut input = b"4567".to_vec();
        input.extend(hello(N2));
        input.extend(b"new");
        assert_eq!(
            d.feed(&input),
            vec![Event::Session(*N2), Event::Data(b"new".to_vec())]
        );
    }

    proptest! {
        #[test]
        fn escaped_data_round_trips(
            payloads in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..300), 0..8),
            junk in proptest::collection::vec(any::<u8>(), 0..64),
            chunk in 1usize..64,
        ) {
            let mut input = junk.clone();
            input.extend(hello(N1));
            let mut expect: Vec<u8> = Vec::new();
            for p in &payloads {
                expect.extend(p);
                input.extend(esc(p));
            }
            let mut d = Deframer::new();
            let ev = run(&mut d, &input, chunk);
            let pos = ev.iter().rposition(|e| *e == Event::Session(*N1)).unwrap();
            let data: Vec<u8> = ev[pos + 1..].iter().flat_map(|e| match e { Event::Data(d) => d.clone(), _ => vec![] }).collect();
            prop_assert_eq!(data, expect);
        }

        #[test]
        fn never_panics(input in proptest::collection::vec(any::<u8>(), 0..2000), chunk in 1usize..50) {
            let mut d = Deframer::new();
            let mut first = hello(N1);
            first.extend(input);
            let _ = run(&mut d, &first, chunk);
        }
    }
}
