//! Destination names and topic patterns.
//!
//! In: `destination` header values. Out: what kind of destination each is, and for topics
//! the routing key and whether a key matches a pattern with `*` (one word) and `#` (zero or
//! more words), as RabbitMQ's topic destinations do.

use smallvec::SmallVec;

use crate::error::TopicError;

/// The destinations the broker knows, by prefix (DESIGN.md "Destinations").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Destination<'a> {
    /// `/topic/<key>`: publish/subscribe on a dot-separated key.
    Topic(&'a str),
    /// `/queue/<name>`: point to point, durable.
    Queue(&'a str),
    /// `/user/...`: user destinations.
    User(&'a str),
    /// `/app/...`: server replies.
    App(&'a str),
    /// Anything else.
    Unknown,
}

impl<'a> Destination<'a> {
    /// Classifies a `destination` header value.
    pub fn parse(destination: &'a str) -> Destination<'a> {
        if let Some(key) = destination.strip_prefix("/topic/") {
            Destination::Topic(key)
        } else if let Some(name) = destination.strip_prefix("/queue/") {
            Destination::Queue(name)
        } else if let Some(rest) = destination.strip_prefix("/user/") {
            Destination::User(rest)
        } else if let Some(rest) = destination.strip_prefix("/app/") {
            Destination::App(rest)
        } else {
            Destination::Unknown
        }
    }
}

/// Most dot-separated words in a key or pattern.
pub const MAX_WORDS: usize = 32;

type Words<'a> = SmallVec<[&'a str; 8]>;

fn words(key: &str) -> Words<'_> {
    key.split('.').collect()
}

fn check_words(key: &str) -> Result<Words<'_>, TopicError> {
    if key.is_empty() {
        return Err(TopicError::Empty);
    }
    let w = words(key);
    if w.iter().any(|w| w.is_empty()) {
        return Err(TopicError::EmptyWord(key.to_owned()));
    }
    if w.len() > MAX_WORDS {
        return Err(TopicError::TooManyWords(key.to_owned(), MAX_WORDS));
    }
    Ok(w)
}

/// Whether a SUBSCRIBE key has wildcards (a word that is exactly `*` or `#`).
pub fn is_pattern(key: &str) -> bool {
    key.split('.').any(|w| w == "*" || w == "#")
}

/// Checks a key that a SEND publishes to: no empty words, no wildcards.
///
/// # Errors
/// [`TopicError`] naming what is wrong.
pub fn check_publish_key(key: &str) -> Result<(), TopicError> {
    check_words(key)?;
    if is_pattern(key) {
        return Err(TopicError::WildcardSend(key.to_owned()));
    }
    Ok(())
}

/// Checks a key or pattern that a SUBSCRIBE names.
///
/// # Errors
/// [`TopicError`] naming what is wrong.
pub fn check_subscribe_key(key: &str) -> Result<(), TopicError> {
    check_words(key).map(|_| ())
}

/// A topic pattern with `*` and `#` words, matched word by word.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicPattern {
    words: Vec<Box<str>>,
}

impl TopicPattern {
    /// Splits a pattern into words; runs of `#` collapse into one (they match the same keys).
    pub fn new(pattern: &str) -> TopicPattern {
        let mut out: Vec<Box<str>> = Vec::new();
        for w in pattern.split('.') {
            if w == "#" && out.last().is_some_and(|last| &**last == "#") {
                continue;
            }
            out.push(w.into());
        }
        TopicPattern { words: out }
    }

    /// Whether `key` (already split into words) matches.
    ///
    /// Greedy matching with one backtrack point, as for `*` in file globs: `#` first takes
    /// no word, and takes one more each time a later mismatch backtracks to it. Linear in
    /// practice and at worst pattern length times key length, with no recursion.
    pub fn matches_words(&self, key: &[&str]) -> bool {
        let pat = &self.words;
        let (mut p, mut k) = (0, 0);
        let mut backtrack: Option<(usize, usize)> = None;
        while k < key.len() {
            match pat.get(p).map(|w| &**w) {
                Some("#") => {
                    backtrack = Some((p, k));
                    p += 1;
                }
                Some(w) if w == "*" || w == key[k] => {
                    p += 1;
                    k += 1;
                }
                _ => match backtrack {
                    Some((hash, taken)) => {
                        p = hash + 1;
                        k = taken + 1;
                        backtrack = Some((hash, taken + 1));
                    }
                    None => return false,
                },
            }
        }
        pat[p..].iter().all(|w| &**w == "#")
    }

    /// Whether `key` matches.
    pub fn matches(&self, key: &str) -> bool {
        self.matches_words(&words(key))
    }
}

/// Splits a published key into words, once per publish.
pub fn key_words(key: &str) -> SmallVec<[&str; 8]> {
    words(key)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(pattern: &str, key: &str) -> bool {
        TopicPattern::new(pattern).matches(key)
    }

    #[test]
    fn star_matches_exactly_one_word() {
        assert!(m("room.*", "room.lobby"));
        assert!(!m("room.*", "room"));
        assert!(!m("room.*", "room.lobby.extra"));
        assert!(m("*.lobby", "room.lobby"));
        assert!(m("a.*.c", "a.b.c"));
        assert!(!m("a.*.c", "a.c"));
    }

    #[test]
    fn hash_matches_zero_or_more_words() {
        assert!(m("room.#", "room"));
        assert!(m("room.#", "room.lobby"));
        assert!(m("room.#", "room.a.b.c"));
        assert!(!m("room.#", "rooms.a"));
        assert!(m("#", "anything.at.all"));
        assert!(m("#.c", "c"));
        assert!(m("#.c", "a.b.c"));
        assert!(!m("#.c", "a.b.c.d"));
        assert!(m("a.#.c.#.e", "a.c.e"));
        assert!(m("a.#.c.#.e", "a.x.c.y.z.e"));
        assert!(!m("a.#.c.#.e", "a.x.y.z.e"));
        assert!(m("#.*", "a"));
        assert!(m("#.#.#", "x"));
    }

    #[test]
    fn exact_words_only_match_themselves() {
        assert!(m("room.lobby", "room.lobby"));
        assert!(!m("room.lobby", "room.lobby2"));
        assert!(
            !m("room.lob*", "room.lobby"),
            "a star inside a word is literal"
        );
    }

    #[test]
    fn adversarial_patterns_stay_fast() {
        let pattern = vec!["#.a"; 16].join(".");
        let key = vec!["a"; 32].join(".") + ".b";
        assert!(!m(&pattern, &key));
    }

    #[test]
    fn keys_are_checked() {
        assert_eq!(check_publish_key(""), Err(TopicError::Empty));
        assert_eq!(
            check_publish_key("a..b"),
            Err(TopicError::EmptyWord("a..b".into()))
        );
        assert_eq!(
            check_publish_key("room.*"),
            Err(TopicError::WildcardSend("room.*".into()))
        );
        assert!(check_publish_key("room.방").is_ok());
        assert!(check_subscribe_key("room.*").is_ok());
        assert!(check_subscribe_key(&vec!["a"; 33].join(".")).is_err());
    }

    #[test]
    fn destinations_are_classified_by_prefix() {
        assert_eq!(
            Destination::parse("/topic/room.a"),
            Destination::Topic("room.a")
        );
        assert_eq!(
            Destination::parse("/queue/jobs"),
            Destination::Queue("jobs")
        );
        assert_eq!(
            Destination::parse("/user/queue/dm"),
            Destination::User("queue/dm")
        );
        assert_eq!(Destination::parse("/app/rooms"), Destination::App("rooms"));
        assert_eq!(Destination::parse("/exchange/x"), Destination::Unknown);
        assert_eq!(Destination::parse("topic/a"), Destination::Unknown);
    }
}
