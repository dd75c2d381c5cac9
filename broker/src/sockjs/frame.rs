//! SockJS frames (`o`, `h`, `a[...]`, `c[code,"reason"]`) and the JSON strings inside them.
//!
//! In: application messages and close reasons. Out: frame text, before each transport's own
//! wrapping (a newline, an EventSource `data:` line, an htmlfile `<script>`).

use std::fmt::Write as _;

/// How a session ended: the `c[code,"reason"]` frame every later request gets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Close {
    /// The close code (3000-4999 for applications, as WebSocket's).
    pub code: u16,
    /// Why.
    pub reason: String,
}

impl Close {
    /// `c[3000,"Go away!"]`: the application ended the session.
    pub fn go_away() -> Close {
        Close::new(3000, "Go away!")
    }

    /// `c[1002,"Connection interrupted"]`: a receiving request was cut.
    pub fn interrupted() -> Close {
        Close::new(1002, "Connection interrupted")
    }

    /// `c[2010,"Another connection still open"]`: a second receiving request.
    pub fn busy() -> Close {
        Close::new(2010, "Another connection still open")
    }

    /// A close with `code` and `reason`.
    pub fn new(code: u16, reason: &str) -> Close {
        Close {
            code,
            reason: reason.to_owned(),
        }
    }

    /// The frame: `c[3000,"Go away!"]`.
    pub fn to_frame(&self) -> String {
        let mut frame = format!("c[{},", self.code);
        push_json_string(&mut frame, &self.reason);
        frame.push(']');
        frame
    }
}

/// Characters the server writes as `\uXXXX`: controls, and those browsers or proxies
/// mangle in transit (sockjs-protocol "JSON Unicode Encoding").
fn must_escape(c: char) -> bool {
    matches!(c,
        '\u{0}'..='\u{1f}'
        | '\u{7f}'..='\u{9f}'
        | '\u{200c}'..='\u{200f}'
        | '\u{2028}'..='\u{202f}'
        | '\u{2060}'..='\u{206f}'
        | '\u{fff0}'..='\u{ffff}')
}

/// Appends `text` to `out` as a JSON string literal, escaping as SockJS servers do.
pub fn push_json_string(out: &mut String, text: &str) {
    out.reserve(text.len() + 2);
    out.push('"');
    let mut plain = 0;
    for (at, c) in text.char_indices() {
        let escaped = match c {
            '"' => Some("\\\""),
            '\\' => Some("\\\\"),
            '\n' => Some("\\n"),
            '\r' => Some("\\r"),
            '\t' => Some("\\t"),
            '\u{8}' => Some("\\b"),
            '\u{c}' => Some("\\f"),
            c if must_escape(c) => None,
            _ => continue,
        };
        out.push_str(&text[plain..at]);
        plain = at + c.len_utf8();
        match escaped {
            Some(escaped) => out.push_str(escaped),
            None => {
                let _ = write!(out, "\\u{:04x}", u32::from(c));
            }
        }
    }
    out.push_str(&text[plain..]);
    out.push('"');
}

/// `text` as a JSON string literal.
pub fn json_string(text: &str) -> String {
    let mut out = String::new();
    push_json_string(&mut out, text);
    out
}

/// `a[...]` around messages already JSON-encoded and comma-separated.
pub fn messages_frame(messages: &str) -> String {
    let mut frame = String::with_capacity(messages.len() + 3);
    frame.push_str("a[");
    frame.push_str(messages);
    frame.push(']');
    frame
}

/// Why a client's payload was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PayloadError {
    /// An empty body.
    #[error("Payload expected.")]
    Empty,
    /// Not a JSON string or array of strings.
    #[error("Broken JSON encoding.")]
    Broken,
}

/// The messages of a client payload: a JSON array of strings (or, over WebSocket, one JSON
/// string).
///
/// # Errors
/// [`PayloadError::Empty`] for an empty body, [`PayloadError::Broken`] for anything else
/// that is not that JSON.
pub fn parse_payload(body: &[u8]) -> Result<Vec<String>, PayloadError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Err(PayloadError::Empty);
    }
    if let Ok(messages) = serde_json::from_slice::<Vec<String>>(body) {
        return Ok(messages);
    }
    serde_json::from_slice::<String>(body)
        .map(|message| vec![message])
        .map_err(|_| PayloadError::Broken)
}

/// An htmlfile chunk: the frame as a JavaScript string handed to the page's `p`, with `<`,
/// `>` and `&` escaped so that no message can end the `<script>` element.
pub fn htmlfile_chunk(frame: &str) -> String {
    let literal = json_string(frame)
        .replace('<', "\\u003c")
        .replace('>', "\\u003e")
        .replace('&', "\\u0026");
    format!("<script>\np({literal});\n</script>\r\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strings_are_escaped_as_sockjs_servers_escape_them() {
        assert_eq!(json_string("a\"b\\c"), r#""a\"b\\c""#);
        assert_eq!(json_string("\n\r\u{0}"), r#""\n\r\u0000""#);
        assert_eq!(json_string("\u{2028}\u{ffff}é"), "\"\\u2028\\uffffé\"");
        assert_eq!(json_string("plain"), "\"plain\"");
    }

    #[test]
    fn escaped_strings_read_back_as_they_were() {
        let text = "x\u{7f}\u{200d}\u{1f600}\"\\\t";
        let back: String = serde_json::from_str(&json_string(text)).unwrap_or_default();
        assert_eq!(back, text);
    }

    #[test]
    fn payloads_are_arrays_or_one_string() {
        assert_eq!(
            parse_payload(br#"["a","b"]"#),
            Ok(vec!["a".into(), "b".into()])
        );
        assert_eq!(parse_payload(br#""a""#), Ok(vec!["a".into()]));
        assert_eq!(parse_payload(b"[]"), Ok(vec![]));
        assert_eq!(parse_payload(b""), Err(PayloadError::Empty));
        assert_eq!(parse_payload(br#"["a"#), Err(PayloadError::Broken));
        assert_eq!(parse_payload(b"[1]"), Err(PayloadError::Broken));
    }

    #[test]
    fn an_htmlfile_chunk_cannot_close_its_script() {
        let chunk = htmlfile_chunk("a[\"</script><b>&\"]");
        assert!(!chunk.contains("</script><"));
        assert!(chunk.starts_with("<script>\np(\"a[\\\"\\u003c/script"));
    }

    #[test]
    fn close_frames_name_code_and_reason() {
        assert_eq!(Close::go_away().to_frame(), r#"c[3000,"Go away!"]"#);
        assert_eq!(
            Close::busy().to_frame(),
            r#"c[2010,"Another connection still open"]"#
        );
    }
}
