//! Human output for `mxguard ctl`: aligned tables and short sentences.
//! Every string that came from a client (addresses in an envelope, a
//! HELO) or an operator (a reason) is escaped and capped, so nobody can
//! draw on the terminal of the person reading it.

use std::time::{Duration, UNIX_EPOCH};

use mxguard_smtp::escape_capped;
use serde_json::Value;

fn s(v: &Value) -> String {
    match v {
        Value::Null => "-".into(),
        Value::String(s) => escape_capped(s.as_bytes(), 80),
        other => other.to_string(),
    }
}

fn time(ms: &Value) -> String {
    match ms.as_u64() {
        Some(ms) => {
            humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_millis(ms)).to_string()
        }
        None => "-".into(),
    }
}

/// Columns sized to their widest cell; the last column is not padded.
pub fn table(head: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = head.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let mut line = |cells: Vec<&str>| {
        let mut l = String::new();
        for (cell, w) in cells.iter().zip(&widths) {
            l.push_str(&format!("{cell:<w$}  "));
        }
        out.push_str(l.trim_end());
        out.push('\n');
    };
    line(head.to_vec());
    for row in rows {
        line(row.iter().map(String::as_str).collect());
    }
    out
}

fn entry_line(e: &Value) -> String {
    let mut out = format!("{} ({}", s(&e["net"]), s(&e["source"]));
    if !e["added_by"].is_null() {
        out.push_str(&format!(", added by {}", s(&e["added_by"])));
    }
    if !e["since_unix_ms"].is_null() {
        out.push_str(&format!(", since {}", time(&e["since_unix_ms"])));
    }
    match e["until_unix_ms"].is_null() {
        true => out.push_str(", no expiry"),
        false => out.push_str(&format!(", until {}", time(&e["until_unix_ms"]))),
    }
    if e["reason"].as_str().is_some_and(|r| !r.is_empty()) {
        out.push_str(&format!(", reason: {}", s(&e["reason"])));
    }
    out.push(')');
    out
}

fn counts(v: &Value) -> String {
    match v.as_object() {
        Some(map) => {
            let parts: Vec<String> = map
                .iter()
                .filter(|(_, n)| n.as_u64() != Some(0))
                .map(|(k, n)| format!("{k} {}", s(n)))
                .collect();
            if parts.is_empty() {
                "none".into()
            } else {
                parts.join(", ")
            }
        }
        None => s(v),
    }
}

pub fn human(command: &str, v: &Value) -> String {
    match command {
        "block" | "allow" => {
            let verb = if command == "block" {
                "blocked"
            } else {
                "allowed"
            };
            format!("{verb} {}\n", entry_line(v))
        }
        "unblock" | "unallow" => {
            let verb = if command == "unblock" {
                "unblocked"
            } else {
                "unallowed"
            };
            format!("{verb} {}\n", s(&v["net"]))
        }
        "lookup" => match v["matched"].is_null() {
            true => format!("{}: {}\n", s(&v["address"]), s(&v["verdict"])),
            false => format!(
                "{}: {} by {}\n",
                s(&v["address"]),
                s(&v["verdict"]),
                entry_line(&v["matched"])
            ),
        },
        "list" => {
            let rows: Vec<Vec<String>> = v["entries"]
                .as_array()
                .map(|a| {
                    a.iter()
                        .map(|e| {
                            vec![
                                s(&e["net"]),
                                s(&e["source"]),
                                s(&e["added_by"]),
                                time(&e["since_unix_ms"]),
                                time(&e["until_unix_ms"]),
                                s(&e["reason"]),
                            ]
                        })
                        .collect()
                })
                .unwrap_or_default();
            let mut out = table(&["NET", "SOURCE", "BY", "SINCE", "UNTIL", "REASON"], &rows);
            out.push_str(&format!("{} of {} entries\n", rows.len(), s(&v["total"])));
            out
        }
        "sessions" => {
            let rows: Vec<Vec<String>> = v["sessions"]
                .as_array()
                .map(|a| {
                    a.iter()
                        .map(|x| {
                            let tests: Vec<String> = x["tests"]
                                .as_array()
                                .map(|t| t.iter().map(s).collect())
                                .unwrap_or_default();
                            vec![
                                s(&x["id"]),
                                s(&x["client"]),
                                s(&x["orig_dst"]),
                                s(&x["phase"]),
                                format!("{:.1}s", x["age_seconds"].as_f64().unwrap_or(0.0)),
                                if tests.is_empty() {
                                    "-".into()
                                } else {
                                    tests.join(",")
                                },
                            ]
                        })
                        .collect()
                })
                .unwrap_or_default();
            let mut out = table(
                &["ID", "CLIENT", "DESTINATION", "PHASE", "AGE", "TESTS"],
                &rows,
            );
            out.push_str(&format!(
                "{} of {} live sessions\n",
                rows.len(),
                s(&v["total"])
            ));
            out
        }
        "quarantine-list" => {
            let rows: Vec<Vec<String>> = v["messages"]
                .as_array()
                .map(|a| {
                    a.iter()
                        .map(|m| {
                            let rcpts = m["rcpt_to"].as_array().cloned().unwrap_or_default();
                            let rcpt = match rcpts.as_slice() {
                                [] => "-".to_string(),
                                [one] => format!("<{}>", s(one)),
                                [first, rest @ ..] => format!("<{}> +{}", s(first), rest.len()),
                            };
                            let tests: Vec<String> = m["tests"]
                                .as_array()
                                .map(|t| t.iter().map(s).collect())
                                .unwrap_or_default();
                            vec![
                                s(&m["id"]),
                                s(&m["received"]),
                                s(&m["client"]),
                                format!("<{}>", s(&m["mail_from"])),
                                rcpt,
                                s(&m["size"]),
                                tests.join(","),
                            ]
                        })
                        .collect()
                })
                .unwrap_or_default();
            let mut out = String::new();
            if let Some(skipped) = v["skipped"].as_array() {
                for problem in skipped {
                    out.push_str(&format!("warning: {}\n", s(problem)));
                }
            }
            out.push_str(&table(
                &["ID", "RECEIVED", "CLIENT", "FROM", "RCPTS", "SIZE", "TESTS"],
                &rows,
            ));
            out.push_str(&format!("{} of {} messages\n", rows.len(), s(&v["total"])));
            out
        }
        "quarantine-show" => {
            let m = &v["meta"];
            let list = |x: &Value| {
                x.as_array()
                    .map(|a| a.iter().map(s).collect::<Vec<_>>().join(", "))
                    .unwrap_or_default()
            };
            let mut out = String::new();
            out.push_str(&format!("id:        {}\n", s(&m["id"])));
            out.push_str(&format!("received:  {}\n", s(&m["received"])));
            out.push_str(&format!("client:    {}\n", s(&m["client"])));
            out.push_str(&format!("helo:      {}\n", s(&m["helo"])));
            out.push_str(&format!("mail from: <{}>\n", s(&m["mail_from"])));
            out.push_str(&format!("rcpt to:   {}\n", list(&m["rcpt_to"])));
            out.push_str(&format!("tests:     {}\n", list(&m["tests"])));
            out.push_str(&format!("size:      {} bytes\n\n", s(&v["size"])));
            match v["message"].as_str() {
                // Escaped line by line: the content is the sender's.
                Some(text) => {
                    for line in text.split('\n') {
                        let line = line.strip_suffix('\r').unwrap_or(line);
                        out.push_str(&escape_capped(line.as_bytes(), 100_000));
                        out.push('\n');
                    }
                }
                None => out.push_str("(not UTF-8: use --json for message_base64)\n"),
            }
            out
        }
        "quarantine-release" => format!(
            "released {} to {} ({} bytes, {} recipient(s)): {}\n",
            s(&v["id"]),
            s(&v["upstream"]),
            s(&v["size"]),
            v["recipients"].as_array().map_or(0, Vec::len),
            s(&v["reply"])
        ),
        "quarantine-delete" => format!("deleted {}\n", s(&v["deleted"])),
        "reload" => {
            let mut out = match v["file"].as_str() {
                Some(f) => format!("reloaded {}\n", escape_capped(f.as_bytes(), 200)),
                None => "nothing to reload\n".to_string(),
            };
            if let Some(w) = v["warnings"].as_array() {
                for w in w {
                    out.push_str(&format!("warning: {}\n", s(w)));
                }
            }
            out
        }
        "stats" => {
            let mut out = String::new();
            let line = |out: &mut String, k: &str, v: String| {
                out.push_str(&format!("{k:<14} {v}\n"));
            };
            line(&mut out, "version", s(&v["version"]));
            line(&mut out, "uptime", format!("{}s", s(&v["uptime_seconds"])));
            line(
                &mut out,
                "connections",
                format!(
                    "{} accepted; {}",
                    s(&v["connections"]["accepted"]),
                    counts(&v["connections"]["by_outcome"])
                ),
            );
            line(&mut out, "detections", counts(&v["detections"]));
            line(&mut out, "actions", counts(&v["actions"]));
            line(
                &mut out,
                "sessions",
                format!(
                    "{} live ({})",
                    s(&v["sessions"]["live"]),
                    counts(&v["sessions"]["by_phase"])
                ),
            );
            line(
                &mut out,
                "blocklist",
                format!(
                    "{} entries ({} static, {} dynamic)",
                    s(&v["blocklist"]["entries"]),
                    s(&v["blocklist"]["static"]),
                    s(&v["blocklist"]["dynamic"])
                ),
            );
            line(
                &mut out,
                "allowlist",
                format!(
                    "{} entries ({} static, {} dynamic)",
                    s(&v["allowlist"]["entries"]),
                    s(&v["allowlist"]["static"]),
                    s(&v["allowlist"]["dynamic"])
                ),
            );
            line(
                &mut out,
                "quarantine",
                format!(
                    "{} messages, {} bytes",
                    s(&v["quarantine"]["messages"]),
                    s(&v["quarantine"]["bytes"])
                ),
            );
            line(&mut out, "reloads", counts(&v["config_reloads"]));
            out
        }
        "config" => match toml::to_string_pretty(v) {
            Ok(text) => text,
            Err(_) => format!("{}\n", serde_json::to_string_pretty(v).unwrap_or_default()),
        },
        "ready" => {
            let mut out = format!(
                "{}\n",
                if v["ready"].as_bool() == Some(true) {
                    "ready"
                } else {
                    "NOT ready"
                }
            );
            if let Some(checks) = v["checks"].as_object() {
                for (name, c) in checks {
                    let mark = if c["ok"].as_bool() == Some(true) {
                        "ok  "
                    } else {
                        "FAIL"
                    };
                    out.push_str(&format!("  {mark} {name}: {}\n", s(&c["detail"])));
                }
            }
            out
        }
        _ => format!("{}\n", serde_json::to_string_pretty(v).unwrap_or_default()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_lookup_says_who_blocked_and_until_when() {
        let v = json!({
            "address": "192.0.2.7", "verdict": "blocked",
            "matched": { "net": "192.0.2.0/24", "source": "admin", "added_by": "ops",
                         "since_unix_ms": 0, "until_unix_ms": null, "reason": "spam\u{1b}[2J" }
        });
        let text = human("lookup", &v);
        assert!(text.starts_with("192.0.2.7: blocked by 192.0.2.0/24 (admin, added by ops, since 1970-01-01T00:00:00Z, no expiry"), "{text}");
        assert!(!text.contains('\u{1b}'), "{text}");
    }

    #[test]
    fn tables_align_columns() {
        let t = table(&["A", "BB"], &[vec!["xxx".into(), "y".into()]]);
        assert_eq!(t, "A    BB\nxxx  y\n");
    }
}
