//! What the API takes (issue 25, items 17 and 18), end to end over the real binary:
//! archive entry names that are too long, too deep or read as paths by other tools;
//! JSON endpoints' media type and encoding; header bytes that are not UTF-8; JWTs issued
//! in the future; expired API keys as `keys ls` shows them.

mod common;

use std::path::Path;

use common::*;
use serde_json::{Value, json};

const MANIFEST: &str =
    "name = \"input-names\"\nruntime = \"python3\"\nhandler = \"main.handler\"\n";
const MAIN_PY: &[u8] = b"def handler(event, context):\n    return event\n";

/// A ustar header for a name of any bytes: up to 100 inline, longer ones after a GNU
/// long-name record (what GNU tar writes).
fn named_entry(out: &mut Vec<u8>, name: &[u8], data: &[u8]) {
    if name.len() > 100 {
        let mut record = name.to_vec();
        record.push(0);
        out.extend_from_slice(&header("././@LongLink", record.len(), b'L', "", "0000644"));
        pad_to_block(out, &record);
    }
    let mut h = header("placeholder", data.len(), b'0', "", "0000644");
    h[..100].fill(0);
    let inline = &name[..name.len().min(100)];
    h[..inline.len()].copy_from_slice(inline);
    h[148..156].copy_from_slice(b"        ");
    let sum: u32 = h.iter().map(|b| u32::from(*b)).sum();
    h[148..156].copy_from_slice(format!("{sum:06o}\0 ").as_bytes());
    out.extend_from_slice(&h);
    pad_to_block(out, data);
}

fn pad_to_block(out: &mut Vec<u8>, data: &[u8]) {
    out.extend_from_slice(data);
    out.extend(std::iter::repeat_n(0u8, (512 - data.len() % 512) % 512));
}

fn count_entries(dir: &Path) -> usize {
    std::fs::read_dir(dir).map(|d| d.count()).unwrap_or(0)
}

// ---------------------------------------------------------------- item 17

#[test]
fn archive_names_too_long_too_deep_or_misread_are_refused_and_nothing_is_stored() {
    let s = Server::start();
    let huge = vec![b'a'; 4000];
    let deep = format!("{}main.py", "d/".repeat(65));
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("a 4,000-byte name", huge, "aaaa"),
        (
            "a 256-byte component",
            format!("{}/x", "c".repeat(256)).into_bytes(),
            "cccc",
        ),
        ("65 levels deep", deep.into_bytes(), "d/d/d/"),
        ("backslash dot-dot", br"..\..\x".to_vec(), r"..\..\x"),
        ("drive letter", br"C:\x".to_vec(), r"C:\x"),
        ("drive-relative", b"C:x".to_vec(), "C:x"),
        (
            "fullwidth dots and slash",
            "\u{FF0E}\u{FF0E}\u{FF0F}x".into(),
            "\u{FF0E}\u{FF0E}",
        ),
        ("division slash", "a\u{2215}..\u{2215}b".into(), "a\u{2215}"),
        ("overlong slash", b"a\xC0\xAFb".to_vec(), "a"),
        ("newline", b"evil\nname".to_vec(), "evil"),
    ];
    for (case, name, shown) in cases {
        let body = tar_with(MANIFEST, |b| {
            named_entry(b, b"main.py", MAIN_PY);
            named_entry(b, &name, b"x");
        });
        let resp = s
            .admin(reqwest::Method::POST, "/v1/functions")
            .body(body)
            .send()
            .expect("deploy");
        let status = resp.status().as_u16();
        let v: Value = resp.json().expect("json body");
        assert_eq!(status, 400, "{case}: {v}");
        assert_eq!(v["error"]["code"], "invalid_archive", "{case}: {v}");
        let msg = v["error"]["message"].as_str().expect("message");
        assert!(msg.contains(shown), "{case}: the entry is named: {msg}");
        assert!(
            msg.len() < 400,
            "{case}: the name is cut for display: {msg}"
        );
        assert!(
            !msg.contains('\n'),
            "{case}: no raw control characters: {msg:?}"
        );
        let data = s.data.to_string_lossy();
        assert!(
            !msg.contains(data.as_ref()),
            "{case}: no staging path: {msg}"
        );
    }
    let ls = s.json(&["ls"]);
    assert_eq!(ls, json!([]), "no function was created");
    for dir in ["blobs", "code", "tmp"] {
        let path = s.data.join("artifacts").join(dir);
        assert_eq!(count_entries(&path), 0, "artifacts/{dir} is empty");
    }
    let log = s.stderr();
    assert!(!log.contains("control API request failed"), "no 500: {log}");
    assert!(!log.contains("File name too long"), "{log}");
}
