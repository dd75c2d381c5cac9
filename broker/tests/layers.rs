//! What may import what (docs/ARCHITECTURE.md): each module of `broker/src` names its layer
//! here, and may use `crate::` paths of its own layer or lower ones only. Doc comments may
//! link anywhere.

// Test code: a panic is the test failing, with its message.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;

/// Each top-level module and its layer, lowest first.
const LAYERS: &[(&str, u8)] = &[
    // 1. The model and leaf utilities: import nothing else of the broker.
    ("error", 1),
    ("message", 1),
    ("destination", 1),
    ("outbox", 1),
    ("metrics", 1),
    ("admission", 1),
    ("pace", 1),
    ("tls", 1),
    ("writer", 1),
    ("acl", 1),
    ("receipts", 1),
    ("sessions", 1),
    // 2. Storage.
    ("store", 2),
    ("durable", 2),
    ("cluster", 2),
    // 3. Services, identity and settings.
    ("service", 3),
    ("services", 3),
    ("router", 3),
    ("auth", 3),
    ("config", 3),
    // 4. One connection's protocol state.
    ("session", 4),
    // 5. The broker's shared state and one connection's task.
    ("state", 5),
    ("connection", 5),
    // 6. The edges: transports, HTTP, accept loops, subcommands.
    ("transport", 6),
    ("sockjs", 6),
    ("http", 6),
    ("admin", 6),
    ("room_api", 6),
    ("server", 6),
    ("cli", 6),
];

fn layer(module: &str) -> Option<u8> {
    LAYERS.iter().find(|(m, _)| *m == module).map(|(_, l)| *l)
}

/// The `crate::<module>` paths a source file uses outside comments.
fn uses(source: &str) -> Vec<String> {
    let mut found = Vec::new();
    for line in source.lines() {
        let code = line.split("//").next().unwrap_or("");
        let mut rest = code;
        while let Some(at) = rest.find("crate::") {
            rest = &rest[at + "crate::".len()..];
            let name: String = rest
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            found.push(name);
        }
    }
    found
}

fn rust_files(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

#[test]
fn every_module_imports_only_its_own_layer_or_lower_ones() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let mut wrong = Vec::new();
    for file in &files {
        let relative = file.strip_prefix(&src).unwrap();
        let top = relative
            .components()
            .next()
            .unwrap()
            .as_os_str()
            .to_str()
            .unwrap();
        let module = top.trim_end_matches(".rs");
        if module == "lib" || module == "main" {
            continue;
        }
        let own =
            layer(module).unwrap_or_else(|| panic!("{module} has no layer in tests/layers.rs"));
        for used in uses(&std::fs::read_to_string(file).unwrap()) {
            let theirs = layer(&used)
                .unwrap_or_else(|| panic!("{used} (used in {}) has no layer", relative.display()));
            if theirs > own {
                wrong.push(format!(
                    "{} (layer {own}) uses crate::{used} (layer {theirs})",
                    relative.display()
                ));
            }
        }
    }
    assert!(
        wrong.is_empty(),
        "imports against the layers:\n{}",
        wrong.join("\n")
    );
}
