//! What a user may do: `--acl FILE` (`../shared/design/security.md`, "What a user may do").
//!
//! In: the TOML file (read at start, again on SIGHUP), a user's name and groups, and a
//! destination. Out: whether that user may SEND to it or SUBSCRIBE to it; for a wildcard
//! SUBSCRIBE, whether any destination it matches could be allowed (each delivery is then
//! checked on its own destination).
//!
//! Patterns match the whole destination: `*` is one word (one or more characters, none of
//! them `/` or `.`), `#` anything to the end (nothing included), `{user}` the user's own name,
//! everything else itself, case-sensitive. A frame is allowed when some `allow` rule matches
//! it and no `deny` rule does.

use std::collections::{BTreeMap, HashSet, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use serde::Deserialize;

/// Why an ACL file cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum AclError {
    /// The file could not be read.
    #[error("cannot read ACL file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// What the OS said.
        source: std::io::Error,
    },
    /// Not TOML of the expected shape.
    #[error("invalid ACL file {path}: {source}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// What was wrong.
        source: Box<toml::de::Error>,
    },
    /// A pattern that cannot be used.
    #[error("invalid ACL file {path}: pattern {pattern:?}: {reason}")]
    Pattern {
        /// The file.
        path: PathBuf,
        /// The pattern.
        pattern: String,
        /// What is wrong with it.
        reason: &'static str,
    },
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    #[serde(default)]
    groups: BTreeMap<String, Vec<String>>,
    #[serde(default)]
    allow: Vec<RuleFile>,
    #[serde(default)]
    deny: Vec<RuleFile>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RuleFile {
    users: Vec<String>,
    #[serde(default)]
    subscribe: Vec<String>,
    #[serde(default)]
    publish: Vec<String>,
    #[serde(default)]
    except: Vec<String>,
}

/// One piece of a pattern.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Piece {
    Text(String),
    /// `*`: one word.
    Word,
    /// `#`: anything to the end.
    Rest,
    /// `{user}`.
    User,
}

/// A destination pattern.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Pattern(Vec<Piece>);

impl Pattern {
    fn parse(text: &str) -> Result<Pattern, &'static str> {
        if text.is_empty() {
            return Err("empty");
        }
        let mut pieces = Vec::new();
        let mut literal = String::new();
        let mut rest = text;
        while let Some(c) = rest.chars().next() {
            let special = if rest.starts_with("{user}") {
                Some((Piece::User, "{user}".len()))
            } else if c == '*' {
                Some((Piece::Word, 1))
            } else if c == '#' {
                Some((Piece::Rest, 1))
            } else {
                None
            };
            match special {
                Some((piece, len)) => {
                    if !literal.is_empty() {
                        pieces.push(Piece::Text(std::mem::take(&mut literal)));
                    }
                    pieces.push(piece);
                    rest = &rest[len..];
                }
                None => {
                    literal.push(c);
                    rest = &rest[c.len_utf8()..];
                }
            }
        }
        if !literal.is_empty() {
            pieces.push(Piece::Text(literal));
        }
        if pieces
            .iter()
            .position(|p| *p == Piece::Rest)
            .is_some_and(|i| i + 1 != pieces.len())
        {
            return Err("'#' can only end a pattern");
        }
        Ok(Pattern(pieces))
    }

    /// The pattern as an automaton over characters, `{user}` replaced by `user`.
    fn automaton(&self, user: &str) -> Nfa {
        let mut nfa = Nfa::new();
        let mut at = nfa.start();
        for piece in &self.0 {
            at = match piece {
                Piece::Text(text) => nfa.literal(at, text),
                Piece::User => nfa.literal(at, user),
                Piece::Word => nfa.word(at),
                Piece::Rest => nfa.any_run(at),
            };
        }
        nfa.accept(at);
        nfa
    }

    fn matches(&self, user: &str, destination: &str) -> bool {
        match_pieces(&self.0, user, destination)
    }
}

/// Whether `text` is matched by `pieces` whole (backtracking over `*`'s lengths only).
fn match_pieces(pieces: &[Piece], user: &str, text: &str) -> bool {
    let Some((piece, rest)) = pieces.split_first() else {
        return text.is_empty();
    };
    match piece {
        Piece::Text(literal) => text
            .strip_prefix(literal.as_str())
            .is_some_and(|after| match_pieces(rest, user, after)),
        Piece::User => text
            .strip_prefix(user)
            .is_some_and(|after| match_pieces(rest, user, after)),
        // '#' ends every pattern that has one.
        Piece::Rest => true,
        Piece::Word => {
            let word = text.find(['/', '.']).unwrap_or(text.len());
            (1..=word)
                .rev()
                .filter(|&end| text.is_char_boundary(end))
                .any(|end| match_pieces(rest, user, &text[end..]))
        }
    }
}

/// A character class on an automaton's edge.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Class {
    Char(char),
    /// A character of a word: not `/` nor `.`.
    WordChar,
    Any,
}

impl Class {
    fn contains(self, c: char) -> bool {
        match self {
            Class::Char(d) => c == d,
            Class::WordChar => c != '/' && c != '.',
            Class::Any => true,
        }
    }

    /// Whether some character is in both.
    fn meets(self, other: Class) -> bool {
        match (self, other) {
            (Class::Char(c), o) | (o, Class::Char(c)) => o.contains(c),
            _ => true,
        }
    }
}

/// A small nondeterministic automaton over characters, with empty edges.
#[derive(Debug, Clone)]
struct Nfa {
    edges: Vec<Vec<(Class, usize)>>,
    empty: Vec<Vec<usize>>,
    accepting: Vec<bool>,
}

impl Nfa {
    fn new() -> Nfa {
        Nfa {
            edges: vec![Vec::new()],
            empty: vec![Vec::new()],
            accepting: vec![false],
        }
    }

    fn start(&self) -> usize {
        0
    }

    fn state(&mut self) -> usize {
        self.edges.push(Vec::new());
        self.empty.push(Vec::new());
        self.accepting.push(false);
        self.edges.len() - 1
    }

    fn edge(&mut self, from: usize, class: Class, to: usize) {
        self.edges[from].push((class, to));
    }

    fn empty_edge(&mut self, from: usize, to: usize) {
        self.empty[from].push(to);
    }

    fn literal(&mut self, mut at: usize, text: &str) -> usize {
        for c in text.chars() {
            let next = self.state();
            self.edge(at, Class::Char(c), next);
            at = next;
        }
        at
    }

    /// One or more word characters.
    fn word(&mut self, at: usize) -> usize {
        let next = self.state();
        self.edge(at, Class::WordChar, next);
        self.edge(next, Class::WordChar, next);
        next
    }

    /// Anything, nothing included: a loop on the state itself.
    fn any_run(&mut self, at: usize) -> usize {
        self.edge(at, Class::Any, at);
        at
    }

    fn accept(&mut self, at: usize) {
        self.accepting[at] = true;
    }

    /// `states` and every state their empty edges reach.
    fn closure(&self, states: impl IntoIterator<Item = usize>) -> HashSet<usize> {
        let mut seen: HashSet<usize> = HashSet::new();
        let mut stack: Vec<usize> = states.into_iter().collect();
        while let Some(s) = stack.pop() {
            if seen.insert(s) {
                stack.extend(self.empty[s].iter().copied());
            }
        }
        seen
    }

    #[cfg(test)]
    fn matches(&self, text: &str) -> bool {
        let mut current = self.closure([0]);
        for c in text.chars() {
            let next: Vec<usize> = current
                .iter()
                .flat_map(|&s| self.edges[s].iter())
                .filter(|(class, _)| class.contains(c))
                .map(|&(_, to)| to)
                .collect();
            current = self.closure(next);
            if current.is_empty() {
                return false;
            }
        }
        current.iter().any(|&s| self.accepting[s])
    }

    /// Whether some text is accepted by both.
    fn meets(&self, other: &Nfa) -> bool {
        let start: Vec<(usize, usize)> = self
            .closure([0])
            .into_iter()
            .flat_map(|a| other.closure([0]).into_iter().map(move |b| (a, b)))
            .collect();
        let mut seen: HashSet<(usize, usize)> = start.iter().copied().collect();
        let mut queue: VecDeque<(usize, usize)> = start.into();
        while let Some((a, b)) = queue.pop_front() {
            if self.accepting[a] && other.accepting[b] {
                return true;
            }
            for &(ca, na) in &self.edges[a] {
                for &(cb, nb) in &other.edges[b] {
                    if !ca.meets(cb) {
                        continue;
                    }
                    for a2 in self.closure([na]) {
                        for b2 in other.closure([nb]) {
                            if seen.insert((a2, b2)) {
                                queue.push_back((a2, b2));
                            }
                        }
                    }
                }
            }
        }
        false
    }
}

/// A SUBSCRIBE to `/topic/<key>` with `*` and `#` words (RabbitMQ's topic patterns: `*` one
/// word, `#` zero or more) as an automaton over the destinations it matches.
fn topic_automaton(key: &str) -> Nfa {
    let mut nfa = Nfa::new();
    let mut at = nfa.literal(0, "/topic/");
    let words: Vec<&str> = key.split('.').collect();
    // Whether no word has been written yet (the next needs no '.' before it).
    let mut first = true;
    for (i, word) in words.iter().enumerate() {
        let last = i + 1 == words.len();
        match *word {
            "#" if first && last => {
                // Any words, or none: (W+ ('.' W+)*)?
                let end = nfa.state();
                nfa.empty_edge(at, end);
                let w = nfa.word(at);
                let dot = nfa.state();
                nfa.edge(w, Class::Char('.'), dot);
                nfa.edge(dot, Class::WordChar, w);
                nfa.empty_edge(w, end);
                at = end;
            }
            "#" if first => {
                // (W+ '.')*, and the next word follows without a '.' of its own.
                let out = nfa.state();
                nfa.empty_edge(at, out);
                let w = nfa.word(at);
                nfa.edge(w, Class::Char('.'), at);
                at = out;
            }
            "#" => {
                // ('.' W+)*
                let out = nfa.state();
                nfa.empty_edge(at, out);
                let dot = nfa.state();
                nfa.edge(at, Class::Char('.'), dot);
                let w = nfa.word(dot);
                nfa.empty_edge(w, at);
                at = out;
            }
            word => {
                if !first {
                    at = nfa.literal(at, ".");
                }
                at = if word == "*" {
                    nfa.word(at)
                } else {
                    nfa.literal(at, word)
                };
                first = false;
            }
        }
    }
    nfa.accept(at);
    nfa
}

/// Who a rule names: a user, `@group`, or `*` (anyone).
#[derive(Debug, Clone, PartialEq, Eq)]
enum Who {
    Anyone,
    User(String),
    Group(String),
}

impl Who {
    fn parse(text: &str) -> Who {
        match text {
            "*" => Who::Anyone,
            _ => match text.strip_prefix('@') {
                Some(group) => Who::Group(group.to_owned()),
                None => Who::User(text.to_owned()),
            },
        }
    }
}

#[derive(Debug, Clone)]
struct Rule {
    users: Vec<Who>,
    except: Vec<Who>,
    subscribe: Vec<Pattern>,
    publish: Vec<Pattern>,
}

/// What a frame asks to do with a destination.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// SEND.
    Publish,
    /// SUBSCRIBE.
    Subscribe,
}

/// A user as the rules see it.
#[derive(Debug, Clone, Copy)]
pub struct User<'a> {
    /// The name (`{user}` in patterns).
    pub name: &'a str,
    /// The groups the user brings (accounts' or the token's); the file's `[groups]` add more.
    pub groups: &'a [String],
}

/// The rules of one ACL file.
#[derive(Debug, Clone)]
pub struct Acl {
    groups: BTreeMap<String, Vec<String>>,
    allow: Vec<Rule>,
    deny: Vec<Rule>,
}

impl Acl {
    /// Reads and checks an ACL file.
    ///
    /// # Errors
    /// The file cannot be read, is not TOML of the expected shape, or holds a bad pattern.
    pub fn load(path: &Path) -> Result<Acl, AclError> {
        let text = std::fs::read_to_string(path).map_err(|source| AclError::Read {
            path: path.to_owned(),
            source,
        })?;
        Acl::parse(&text, path)
    }

    /// An ACL from TOML text (`path` names it in errors).
    ///
    /// # Errors
    /// As [`Acl::load`].
    pub fn parse(text: &str, path: &Path) -> Result<Acl, AclError> {
        let file: File = toml::from_str(text).map_err(|source| AclError::Parse {
            path: path.to_owned(),
            source: Box::new(source),
        })?;
        let patterns = |list: Vec<String>| -> Result<Vec<Pattern>, AclError> {
            list.into_iter()
                .map(|p| {
                    Pattern::parse(&p).map_err(|reason| AclError::Pattern {
                        path: path.to_owned(),
                        pattern: p.clone(),
                        reason,
                    })
                })
                .collect()
        };
        let rules = |list: Vec<RuleFile>| -> Result<Vec<Rule>, AclError> {
            list.into_iter()
                .map(|r| {
                    Ok(Rule {
                        users: r.users.iter().map(|u| Who::parse(u)).collect(),
                        except: r.except.iter().map(|u| Who::parse(u)).collect(),
                        subscribe: patterns(r.subscribe)?,
                        publish: patterns(r.publish)?,
                    })
                })
                .collect()
        };
        Ok(Acl {
            groups: file.groups,
            allow: rules(file.allow)?,
            deny: rules(file.deny)?,
        })
    }

    fn is(&self, user: User<'_>, who: &Who) -> bool {
        match who {
            Who::Anyone => true,
            Who::User(name) => name == user.name,
            Who::Group(group) => {
                user.groups.iter().any(|g| g == group)
                    || self
                        .groups
                        .get(group)
                        .is_some_and(|members| members.iter().any(|m| m == user.name))
            }
        }
    }

    fn names(&self, user: User<'_>, list: &[Who]) -> bool {
        list.iter().any(|who| self.is(user, who))
    }

    /// Whether the group `group` holds `user` (its own groups or the file's).
    pub fn in_group(&self, user: User<'_>, group: &str) -> bool {
        self.is(user, &Who::Group(group.to_owned()))
    }

    /// Whether `user` may do `action` with `destination`: some allow rule matches and no
    /// deny rule does.
    pub fn allows(&self, user: User<'_>, action: Action, destination: &str) -> bool {
        let matching = |rule: &Rule| {
            let patterns = match action {
                Action::Publish => &rule.publish,
                Action::Subscribe => &rule.subscribe,
            };
            patterns.iter().any(|p| p.matches(user.name, destination))
        };
        self.allow
            .iter()
            .any(|rule| self.names(user, &rule.users) && matching(rule))
            && !self.deny.iter().any(|rule| {
                self.names(user, &rule.users) && !self.names(user, &rule.except) && matching(rule)
            })
    }

    /// Whether `user` may SUBSCRIBE to the wildcard topic `/topic/<key>`: some allowed
    /// subscribe pattern could match a destination the wildcard matches. Each delivery is
    /// then checked with [`Acl::allows`] on its own destination.
    pub fn may_watch(&self, user: User<'_>, key: &str) -> bool {
        let watched = topic_automaton(key);
        self.allow
            .iter()
            .filter(|rule| self.names(user, &rule.users))
            .flat_map(|rule| &rule.subscribe)
            .any(|pattern| pattern.automaton(user.name).meets(&watched))
    }
}

/// The ACL in force, replaced whole on SIGHUP.
#[derive(Debug)]
pub struct AclHandle {
    path: PathBuf,
    current: RwLock<Arc<Acl>>,
}

impl AclHandle {
    /// Loads `path`.
    ///
    /// # Errors
    /// As [`Acl::load`].
    pub fn open(path: &Path) -> Result<AclHandle, AclError> {
        Ok(AclHandle {
            path: path.to_owned(),
            current: RwLock::new(Arc::new(Acl::load(path)?)),
        })
    }

    /// The rules in force.
    pub fn get(&self) -> Arc<Acl> {
        self.current
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Reads the file again; a bad file keeps the rules in force.
    ///
    /// # Errors
    /// Why the file could not be used.
    pub fn reload(&self) -> Result<(), AclError> {
        let acl = Acl::load(&self.path)?;
        *self
            .current
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Arc::new(acl);
        Ok(())
    }
}

/// A subscription's owner as the ACL sees it, for the checks made on each delivery to a
/// wildcard subscription and on room lists.
#[derive(Debug, Clone)]
pub struct Viewer {
    /// The user's name.
    pub name: Arc<str>,
    /// The user's own groups.
    pub groups: Arc<[String]>,
    /// The rules.
    pub acl: Arc<AclHandle>,
}

impl Viewer {
    /// Whether this user may subscribe to `destination`.
    pub fn may_subscribe(&self, destination: &str) -> bool {
        let user = User {
            name: &self.name,
            groups: &self.groups,
        };
        self.acl.get().allows(user, Action::Subscribe, destination)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn acl(text: &str) -> Acl {
        Acl::parse(text, Path::new("test.toml")).unwrap()
    }

    const EXAMPLE: &str = r#"
[groups]
staff = ["alice", "bob"]

[[allow]]
users = ["*"]
subscribe = ["/topic/room.*", "/user/queue/#", "/app/#"]
publish   = ["/topic/room.*", "/user/*/queue/*"]

[[deny]]
users = ["*"]
subscribe = ["/topic/room.staff"]
publish   = ["/topic/room.staff"]
except = ["@staff"]

[[allow]]
users = ["@staff"]
subscribe = ["/queue/#"]
publish   = ["/queue/#"]

[[allow]]
users = ["*"]
subscribe = ["/topic/private.{user}.*"]
"#;

    fn user<'a>(name: &'a str, groups: &'a [String]) -> User<'a> {
        User { name, groups }
    }

    #[test]
    fn the_contracts_example_reads_as_it_says() {
        let acl = acl(EXAMPLE);
        let (alice, carol) = (user("alice", &[]), user("carol", &[]));
        let sub = Action::Subscribe;
        let publish = Action::Publish;
        assert!(acl.allows(carol, sub, "/topic/room.lobby"));
        assert!(!acl.allows(carol, sub, "/topic/room.staff"), "denied");
        assert!(acl.allows(alice, sub, "/topic/room.staff"), "except @staff");
        assert!(!acl.allows(carol, sub, "/topic/room.a.b"), "* is one word");
        assert!(
            !acl.allows(carol, sub, "/topic/room."),
            "* is one or more characters"
        );
        assert!(acl.allows(carol, publish, "/user/dana/queue/dm"));
        assert!(!acl.allows(carol, publish, "/user/dana/queue/a/b"));
        assert!(acl.allows(carol, sub, "/user/queue/dm"));
        assert!(
            acl.allows(carol, sub, "/user/queue/"),
            "# takes nothing too"
        );
        assert!(!acl.allows(carol, publish, "/queue/jobs"));
        assert!(acl.allows(alice, publish, "/queue/jobs"));
        let staff = ["staff".to_owned()];
        assert!(
            acl.allows(user("erin", &staff), publish, "/queue/jobs"),
            "a group the user brings"
        );
        assert!(acl.allows(carol, sub, "/topic/private.carol.x"));
        assert!(
            !acl.allows(carol, sub, "/topic/private.alice.x"),
            "{{user}} is one's own"
        );
        assert!(
            !acl.allows(carol, sub, "/topic/other"),
            "no allow rule, no access"
        );
        assert!(
            !acl.allows(carol, publish, "/Topic/room.lobby"),
            "case-sensitive"
        );
    }

    #[test]
    fn a_wildcard_subscription_is_accepted_when_some_allowed_pattern_could_meet_it() {
        let acl = acl(EXAMPLE);
        let carol = user("carol", &[]);
        assert!(acl.may_watch(carol, "room.*"));
        assert!(acl.may_watch(carol, "room.#"));
        assert!(acl.may_watch(carol, "#"));
        assert!(acl.may_watch(carol, "*.lobby"));
        assert!(acl.may_watch(carol, "private.carol.#"));
        assert!(!acl.may_watch(carol, "private.alice.#"));
        assert!(!acl.may_watch(carol, "news.*"));
        assert!(
            !acl.may_watch(carol, "room.*.*"),
            "room.* allows one word only"
        );
        assert!(
            acl.may_watch(carol, "room.#.x"),
            "room.x is one of its matches"
        );
    }

    #[test]
    fn topic_automata_match_as_rabbitmq_topic_patterns_do() {
        let cases: &[(&str, &[&str], &[&str])] = &[
            (
                "a.*",
                &["/topic/a.b"],
                &["/topic/a", "/topic/a.b.c", "/topic/a."],
            ),
            (
                "a.#",
                &["/topic/a", "/topic/a.b", "/topic/a.b.c"],
                &["/topic/ab", "/topic/b"],
            ),
            (
                "#.b",
                &["/topic/b", "/topic/a.b", "/topic/x.y.b"],
                &["/topic/a.c", "/topic/.b"],
            ),
            (
                "a.#.b",
                &["/topic/a.b", "/topic/a.x.b", "/topic/a.x.y.b"],
                &["/topic/a.xb"],
            ),
            (
                "#",
                &["/topic/", "/topic/a", "/topic/a.b"],
                &["/topic/a..b"],
            ),
            ("*", &["/topic/a"], &["/topic/", "/topic/a.b"]),
        ];
        for (key, yes, no) in cases {
            let nfa = topic_automaton(key);
            for d in *yes {
                assert!(nfa.matches(d), "{key} should match {d}");
            }
            for d in *no {
                assert!(!nfa.matches(d), "{key} should not match {d}");
            }
        }
    }

    #[test]
    fn bad_files_say_what_is_wrong() {
        let err = Acl::parse(
            "[[allow]]\nusers = [\"*\"]\npublish = [\"/a/#/b\"]",
            Path::new("x.toml"),
        )
        .unwrap_err();
        assert!(
            err.to_string().contains("'#' can only end a pattern"),
            "{err}"
        );
        let err = Acl::parse("[[allow]]\nuser = [\"*\"]", Path::new("x.toml")).unwrap_err();
        assert!(
            err.to_string().starts_with("invalid ACL file x.toml"),
            "{err}"
        );
    }
}
