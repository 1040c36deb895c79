//! The one error model (docs/RUNBOOK.md, "The error table") and the code kept in step: every
//! `ErrorInfo.reason` a service can send has a row, and every row names a reason that is sent.
use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
};

fn repository() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("the tests crate sits in the repository").to_owned()
}

/// Production sources of the services and the crates they run on: test modules (from
/// `#[cfg(test)]` on) and test-only crates left out.
fn production_sources() -> Vec<(PathBuf, String)> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
        for entry in std::fs::read_dir(dir).expect("readable source directory").flatten() {
            let path = entry.path();
            if path.is_dir() {
                walk(&path, out);
            } else if path.extension().is_some_and(|e| e == "rs") {
                out.push(path);
            }
        }
    }
    let root = repository();
    let mut files = Vec::new();
    for group in ["crates", "services"] {
        for member in std::fs::read_dir(root.join(group)).expect("crates/ and services/").flatten() {
            let name = member.file_name().to_string_lossy().into_owned();
            if ["testkit", "bench", "demo"].contains(&name.as_str()) {
                continue;
            }
            let src = member.path().join("src");
            if src.is_dir() {
                walk(&src, &mut files);
            }
        }
    }
    files
        .into_iter()
        .map(|path| {
            let text = std::fs::read_to_string(&path).expect("readable source");
            let production = text.split("#[cfg(test)]").next().unwrap_or_default().to_owned();
            (path, production)
        })
        .collect()
}

/// The string literal right after each `marker` (whitespace skipped), if it looks like a reason.
fn literals_after(text: &str, marker: &str) -> Vec<String> {
    let mut found = Vec::new();
    let mut rest = text;
    while let Some(at) = rest.find(marker) {
        rest = &rest[at + marker.len()..];
        let trimmed = rest.trim_start();
        if let Some(quoted) = trimmed.strip_prefix('"') {
            let literal: String = quoted.chars().take_while(|&c| c != '"').collect();
            if literal.len() >= 4 && literal.chars().all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_') {
                found.push(literal);
            }
        }
    }
    found
}

fn refusal_reasons() -> Vec<String> {
    let proto = std::fs::read_to_string(repository().join("proto/yidi/v1/common.proto")).expect("common.proto");
    proto
        .lines()
        .filter_map(|line| line.trim().split_once(" = ").map(|(name, _)| name.to_owned()))
        .filter(|name| name.starts_with("REFUSAL_REASON_") && name != "REFUSAL_REASON_UNSPECIFIED")
        .collect()
}

/// Every reason the code can put into `ErrorInfo`.
fn reasons_in_code() -> BTreeSet<String> {
    let mut reasons: BTreeSet<String> = refusal_reasons().into_iter().collect();
    for (path, text) in production_sources() {
        for marker in ["precondition(", "reason: ", "set_error_info("] {
            reasons.extend(literals_after(&text, marker));
        }
        // The fixed reasons of `ApiError::reason` and the decision codes.
        if path.ends_with("crates/grpc/src/error.rs") || path.ends_with("crates/domain/src/decision.rs") {
            reasons.extend(literals_after(&text, "=> "));
        }
    }
    reasons
}

fn table_rows() -> Vec<(String, String, String)> {
    let runbook = std::fs::read_to_string(repository().join("docs/RUNBOOK.md")).expect("docs/RUNBOOK.md");
    let table = runbook.split("#### The error table").nth(1).expect("the runbook has the error table");
    table
        .lines()
        .skip_while(|line| !line.starts_with('|'))
        .take_while(|line| line.starts_with('|'))
        .skip(2)
        .map(|line| {
            let cells: Vec<String> = line.split('|').map(|cell| cell.trim().trim_matches('`').to_owned()).collect();
            (cells[1].clone(), cells[2].clone(), cells[3].clone())
        })
        .collect()
}

#[test]
fn every_reason_the_services_send_is_in_the_error_table_once() {
    let rows = table_rows();
    let documented: BTreeSet<String> = rows.iter().map(|(reason, _, _)| reason.clone()).collect();
    assert_eq!(documented.len(), rows.len(), "a reason has two rows");
    let in_code = reasons_in_code();
    assert!(in_code.len() > 40, "the scan found too few reasons to be looking at the code: {in_code:?}");
    let missing: Vec<&String> = in_code.difference(&documented).collect();
    assert!(missing.is_empty(), "reasons the code sends that the error table lacks: {missing:?}");
}

#[test]
fn every_row_of_the_error_table_is_sent_by_the_code_and_says_whether_to_retry() {
    let sources: String = production_sources().into_iter().map(|(_, text)| text).collect();
    let refusals = refusal_reasons();
    for (reason, code, retry) in table_rows() {
        assert!(
            refusals.contains(&reason) || sources.contains(&format!("\"{reason}\"")),
            "the error table lists {reason}, which no service sends"
        );
        assert!(["yes", "no", "once"].contains(&retry.as_str()), "{reason}: retry is {retry:?}");
        assert!(!code.is_empty(), "{reason}: no code");
    }
}

#[test]
fn transient_reasons_are_retryable_and_definitive_ones_are_not() {
    // The table says the same as the peers' retry rule (`yidi_grpc::client::is_transient`).
    use tonic::Code;
    let code_of = |name: &str| match name {
        "INVALID_ARGUMENT" => Code::InvalidArgument,
        "NOT_FOUND" => Code::NotFound,
        "ALREADY_EXISTS" => Code::AlreadyExists,
        "FAILED_PRECONDITION" => Code::FailedPrecondition,
        "PERMISSION_DENIED" => Code::PermissionDenied,
        "UNAUTHENTICATED" => Code::Unauthenticated,
        "RESOURCE_EXHAUSTED" => Code::ResourceExhausted,
        "UNAVAILABLE" => Code::Unavailable,
        "INTERNAL" => Code::Internal,
        other => panic!("unknown code {other:?} in the error table"),
    };
    for (reason, codes, retry) in table_rows() {
        if reason.starts_with("REFUSAL_REASON_") {
            continue;
        }
        for code in codes.split(", ") {
            let code = code_of(code);
            // One exception on purpose: NOT_CANCELLABLE is a race the caller may simply repeat.
            let expected = if reason == "NOT_CANCELLABLE" { false } else { retry != "no" };
            assert_eq!(yidi_grpc::client::is_transient(code), expected, "{reason} ({code:?}) retry {retry}");
        }
    }
}
