//! The schema and docs/PROTOCOL.md describe the same enums: every
//! `ErrorCode` of ferry.proto is in PROTOCOL.md §13.3 with its number and
//! the closing flag the server sends ([`ErrorCode::is_closing`]), and every
//! `EntryKind` is in §6.4 with its number. Client authors read one and
//! generate code from the other; neither may drift.

use ferry_protocol::ErrorCode;

fn read(relative: &str) -> String {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(relative);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// `(NAME, value)` of every value of `enum name` in the .proto.
fn proto_enum(proto: &str, name: &str) -> Vec<(String, i32)> {
    let start = proto
        .find(&format!("enum {name} {{"))
        .unwrap_or_else(|| panic!("enum {name}"));
    let body = &proto[start..];
    let body = &body[..body.find('}').unwrap()];
    body.lines()
        .map(str::trim)
        .filter(|l| !l.starts_with("//") && l.contains('='))
        .map(|l| {
            let (n, v) = l.trim_end_matches(';').split_once('=').unwrap();
            (n.trim().to_owned(), v.trim().parse().unwrap())
        })
        .collect()
}

/// The cells of the markdown table row that names `` `name` `` in its
/// second column, within `section` of the doc.
fn row<'a>(section: &'a str, name: &str) -> Option<Vec<&'a str>> {
    section.lines().find_map(|l| {
        let cells: Vec<&str> = l.split('|').map(str::trim).collect();
        (cells.len() > 3 && cells[2] == format!("`{name}`")).then_some(cells)
    })
}

fn section<'a>(doc: &'a str, heading: &str) -> &'a str {
    let start = doc.find(heading).unwrap_or_else(|| panic!("{heading}"));
    let rest = &doc[start + heading.len()..];
    let end = rest
        .find("\n### ")
        .or(rest.find("\n## "))
        .unwrap_or(rest.len());
    &rest[..end]
}

#[test]
fn every_error_code_is_documented_with_its_closing_flag() {
    let proto = read("proto/ferry.proto");
    let doc = read("../docs/PROTOCOL.md");
    let table = section(&doc, "### 13.3 Every `ErrorCode`");
    for (name, value) in proto_enum(&proto, "ErrorCode") {
        let cells = row(table, &name).unwrap_or_else(|| panic!("{name} missing from §13.3"));
        assert_eq!(cells[1], value.to_string(), "{name}: number");
        let code = ErrorCode::try_from(value).unwrap();
        let closing = match cells[3] {
            "yes" => true,
            "no" | "—" => false,
            other => panic!("{name}: closing column {other:?}"),
        };
        assert_eq!(closing, code.is_closing(), "{name}: closing flag");
    }
}

#[test]
fn every_entry_kind_is_documented() {
    let proto = read("proto/ferry.proto");
    let doc = read("../docs/PROTOCOL.md");
    let table = section(&doc, "### 6.4 `Deliver`");
    for (name, value) in proto_enum(&proto, "EntryKind") {
        let cells = row(table, &name).unwrap_or_else(|| panic!("{name} missing from §6.4"));
        assert_eq!(cells[1], value.to_string(), "{name}: number");
    }
}
