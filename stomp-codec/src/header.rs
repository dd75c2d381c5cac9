//! Ordered STOMP headers that keep repeated names, and the `heart-beat` header's value.
//!
//! In: header text sliced from a decoded frame, or names and values pushed by a program.
//! Out: `(name, value)` pairs in wire order; lookups return the first occurrence, as
//! 1.2 "Repeated Header Entries" requires.

use std::fmt;

use bytestring::ByteString;
use smallvec::SmallVec;

/// How many headers a frame holds before its header index spills to the heap. Chat frames
/// carry 3 to 8 headers, so decoding them allocates nothing.
pub const INLINE_HEADERS: usize = 10;

/// Where one header sits in [`Headers`]' text: `name = text[start..colon]`,
/// `value = text[colon + 1..end]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Span {
    pub(crate) start: usize,
    pub(crate) colon: usize,
    pub(crate) end: usize,
}

/// The text the spans point into: a slice of the received bytes (no copy), or a string
/// owned by these headers once a program edits them or escapes had to be decoded.
#[derive(Clone)]
enum Text {
    Shared(ByteString),
    Owned(String),
}

impl Text {
    fn as_str(&self) -> &str {
        match self {
            Text::Shared(s) => s,
            Text::Owned(s) => s,
        }
    }
}

/// A frame's headers, in wire order, with repeated names kept.
///
/// ```
/// use stomp_codec::Headers;
///
/// let mut headers = Headers::new();
/// headers.push("destination", "/topic/room.lobby");
/// headers.push("x-tag", "first");
/// headers.push("x-tag", "second");
/// assert_eq!(headers.get("x-tag"), Some("first"));
/// assert_eq!(headers.get_all("x-tag").collect::<Vec<_>>(), ["first", "second"]);
/// ```
#[derive(Clone)]
pub struct Headers {
    text: Text,
    spans: SmallVec<[Span; INLINE_HEADERS]>,
}

impl Default for Headers {
    fn default() -> Self {
        Headers::new()
    }
}

impl Headers {
    /// No headers. Does not allocate.
    pub const fn new() -> Headers {
        Headers {
            text: Text::Owned(String::new()),
            spans: SmallVec::new_const(),
        }
    }

    /// Headers over text that the decoder sliced out of its buffer.
    pub(crate) fn from_shared(
        text: ByteString,
        spans: SmallVec<[Span; INLINE_HEADERS]>,
    ) -> Headers {
        Headers {
            text: Text::Shared(text),
            spans,
        }
    }

    /// Headers over text that the decoder built (after decoding escapes).
    pub(crate) fn from_owned(text: String, spans: SmallVec<[Span; INLINE_HEADERS]>) -> Headers {
        Headers {
            text: Text::Owned(text),
            spans,
        }
    }

    /// The number of header entries, repeats included.
    pub fn len(&self) -> usize {
        self.spans.len()
    }

    /// Whether there are no headers.
    pub fn is_empty(&self) -> bool {
        self.spans.is_empty()
    }

    /// The value of the first header called `name`. Names are case-sensitive.
    pub fn get(&self, name: &str) -> Option<&str> {
        let text = self.text.as_str();
        self.spans
            .iter()
            .find(|s| &text[s.start..s.colon] == name)
            .map(|s| &text[s.colon + 1..s.end])
    }

    /// The values of every header called `name`, in wire order.
    pub fn get_all<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a str> + 'a {
        self.iter().filter(move |(n, _)| *n == name).map(|(_, v)| v)
    }

    /// Whether a header called `name` is present.
    pub fn contains(&self, name: &str) -> bool {
        self.get(name).is_some()
    }

    /// The `(name, value)` pairs in wire order.
    pub fn iter(&self) -> Iter<'_> {
        Iter {
            text: self.text.as_str(),
            spans: self.spans.iter(),
        }
    }

    /// Appends a header. An earlier header of the same name still wins on [`Headers::get`].
    pub fn push(&mut self, name: &str, value: &str) {
        let mut text = self.take_owned_text();
        let start = text.len();
        text.reserve(name.len() + value.len() + 1);
        text.push_str(name);
        let colon = text.len();
        text.push(':');
        text.push_str(value);
        let end = text.len();
        self.text = Text::Owned(text);
        self.spans.push(Span { start, colon, end });
    }

    /// Replaces every header called `name` with one header at the end.
    pub fn set(&mut self, name: &str, value: &str) {
        self.remove(name);
        self.push(name, value);
    }

    /// Removes every header called `name`; returns how many there were.
    pub fn remove(&mut self, name: &str) -> usize {
        let before = self.spans.len();
        let text = self.text.as_str();
        self.spans.retain(|s| &text[s.start..s.colon] != name);
        before - self.spans.len()
    }

    /// Keeps only the headers for which `keep(name, value)` is true.
    pub fn retain(&mut self, mut keep: impl FnMut(&str, &str) -> bool) {
        let text = self.text.as_str();
        self.spans
            .retain(|s| keep(&text[s.start..s.colon], &text[s.colon + 1..s.end]));
    }

    /// Moves the text out as an owned string, copying it if it was shared. The spans keep
    /// their offsets: the copy has the same layout.
    fn take_owned_text(&mut self) -> String {
        match std::mem::replace(&mut self.text, Text::Owned(String::new())) {
            Text::Owned(s) => s,
            Text::Shared(shared) => String::from(&*shared),
        }
    }
}

impl PartialEq for Headers {
    fn eq(&self, other: &Self) -> bool {
        self.iter().eq(other.iter())
    }
}

impl Eq for Headers {}

impl fmt::Debug for Headers {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(self.iter()).finish()
    }
}

impl<'a> FromIterator<(&'a str, &'a str)> for Headers {
    fn from_iter<I: IntoIterator<Item = (&'a str, &'a str)>>(iter: I) -> Self {
        let mut headers = Headers::new();
        for (name, value) in iter {
            headers.push(name, value);
        }
        headers
    }
}

impl<'a> IntoIterator for &'a Headers {
    type Item = (&'a str, &'a str);
    type IntoIter = Iter<'a>;

    fn into_iter(self) -> Iter<'a> {
        self.iter()
    }
}

/// Iterator over `(name, value)` pairs, from [`Headers::iter`].
#[derive(Clone)]
pub struct Iter<'a> {
    text: &'a str,
    spans: std::slice::Iter<'a, Span>,
}

impl<'a> Iterator for Iter<'a> {
    type Item = (&'a str, &'a str);

    fn next(&mut self) -> Option<Self::Item> {
        let s = self.spans.next()?;
        Some((&self.text[s.start..s.colon], &self.text[s.colon + 1..s.end]))
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        self.spans.size_hint()
    }
}

impl ExactSizeIterator for Iter<'_> {}

/// The value of a `heart-beat` header: `cx,cy` in milliseconds (1.1 "Heart-beating").
///
/// In a CONNECT, `send_ms` is how often the client can send and `receive_ms` how often it
/// wants to receive; in a CONNECTED the same from the server's side. `0` means "cannot" or
/// "does not want".
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct HeartBeat {
    /// The smallest interval at which this side can send heart-beats, in ms; 0 for never.
    pub send_ms: u64,
    /// The interval at which this side wants to receive heart-beats, in ms; 0 for never.
    pub receive_ms: u64,
}

/// The error for a `heart-beat` value that is not two comma-separated numbers.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("heart-beat {0:?} is not two comma-separated numbers of milliseconds")]
pub struct InvalidHeartBeat(pub String);

impl HeartBeat {
    /// Reads `cx,cy`. Spaces around the numbers are tolerated.
    ///
    /// # Errors
    /// [`InvalidHeartBeat`] when the value is not two unsigned decimal numbers.
    pub fn parse(value: &str) -> Result<HeartBeat, InvalidHeartBeat> {
        let invalid = || InvalidHeartBeat(value.to_owned());
        let (send, receive) = value.split_once(',').ok_or_else(invalid)?;
        let number = |s: &str| s.trim().parse::<u64>().map_err(|_| invalid());
        Ok(HeartBeat {
            send_ms: number(send)?,
            receive_ms: number(receive)?,
        })
    }

    /// The period at which `self`'s side sends heart-beats to `peer`, in ms; 0 for never.
    /// 1.1: `max(self.send, peer.receive)` unless either is 0.
    pub fn send_interval_ms(self, peer: HeartBeat) -> u64 {
        if self.send_ms == 0 || peer.receive_ms == 0 {
            0
        } else {
            self.send_ms.max(peer.receive_ms)
        }
    }

    /// The period at which `self`'s side expects heart-beats from `peer`, in ms; 0 for never.
    pub fn receive_interval_ms(self, peer: HeartBeat) -> u64 {
        peer.send_interval_ms(self)
    }
}

impl fmt::Display for HeartBeat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{},{}", self.send_ms, self.receive_ms)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_repeated_header_wins() {
        let headers: Headers = [("a", "1"), ("b", "2"), ("a", "3")].into_iter().collect();
        assert_eq!(headers.get("a"), Some("1"));
        assert_eq!(headers.len(), 3);
    }

    #[test]
    fn set_replaces_every_occurrence() {
        let mut headers: Headers = [("a", "1"), ("b", "2"), ("a", "3")].into_iter().collect();
        headers.set("a", "4");
        assert_eq!(headers.iter().collect::<Vec<_>>(), [("b", "2"), ("a", "4")]);
    }

    #[test]
    fn values_may_hold_colons_and_be_empty() {
        let headers: Headers = [("a", "x:y:z"), ("b", "")].into_iter().collect();
        assert_eq!(headers.get("a"), Some("x:y:z"));
        assert_eq!(headers.get("b"), Some(""));
        assert_eq!(headers.get("c"), None);
    }

    #[test]
    fn retain_keeps_order() {
        let mut headers: Headers = [("a", "1"), ("b", "2"), ("c", "3")].into_iter().collect();
        headers.retain(|name, _| name != "b");
        assert_eq!(headers.iter().collect::<Vec<_>>(), [("a", "1"), ("c", "3")]);
    }

    #[test]
    fn heart_beat_parses_and_negotiates_as_the_spec_says() {
        let client = HeartBeat::parse("10000, 20000").unwrap();
        let server = HeartBeat::parse("5000,30000").unwrap();
        // client -> server every max(cx, sy); server -> client every max(sx, cy)
        assert_eq!(client.send_interval_ms(server), 30000);
        assert_eq!(server.send_interval_ms(client), 20000);
        assert_eq!(server.receive_interval_ms(client), 30000);
        let silent = HeartBeat::parse("0,0").unwrap();
        assert_eq!(client.send_interval_ms(silent), 0);
        assert_eq!(silent.send_interval_ms(client), 0);
        assert!(HeartBeat::parse("10000").is_err());
        assert!(HeartBeat::parse("a,b").is_err());
        assert!(HeartBeat::parse("-1,0").is_err());
        assert_eq!(client.to_string(), "10000,20000");
    }
}
