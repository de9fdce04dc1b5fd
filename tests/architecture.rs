//! The layout's rules, checked on the source: every table's SQL lives in its one owner module,
//! and the modules of `src/` depend on each other without cycles.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Each table and the one place allowed to name it in SQL (a file, or a folder).
const OWNERS: [(&str, &str); 13] = [
    ("tasks", "src/queue/"),
    ("mailbox_cursors", "src/cursor.rs"),
    ("messages", "src/ledger.rs"),
    ("ledger_counts", "src/ledger.rs"),
    ("ledger_count_deltas", "src/ledger.rs"),
    ("ledger_horizons", "src/ledger.rs"),
    ("polls", "src/poll_log.rs"),
    ("poll_requests", "src/poll_log.rs"),
    ("mailbox_identities", "src/identity.rs"),
    ("mailbox_slots", "src/mailbox_slots.rs"),
    ("mailbox_slot_waiters", "src/mailbox_slots.rs"),
    ("leader_terms", "src/controller/fence.rs"),
    ("notification_subscriptions", "src/notifications/store.rs"),
];

/// SQL words that put a table name right after them.
const SQL_LEAD_INS: [&str; 6] = ["FROM", "INTO", "UPDATE", "JOIN", "TABLE", "TRUNCATE"];

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let entries = std::fs::read_dir(dir).unwrap_or_else(|e| panic!("reading {dir:?}: {e}"));
    for entry in entries {
        let path = entry.expect("directory entry").path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// `src/...` files, relative to the crate root, with their text minus comment lines and unit
/// test modules (tests may set up any table they need).
fn sources() -> Vec<(String, String)> {
    let mut files = Vec::new();
    rust_files(&root().join("src"), &mut files);
    files.sort();
    files
        .into_iter()
        .map(|path| {
            let text = std::fs::read_to_string(&path).expect("source file");
            let code = text.split("#[cfg(test)]").next().unwrap_or("");
            let code: String = code
                .lines()
                .filter(|line| !line.trim_start().starts_with("//"))
                .collect::<Vec<_>>()
                .join("\n");
            let relative = path
                .strip_prefix(root())
                .expect("under the crate")
                .to_string_lossy()
                .replace('\\', "/");
            (relative, code)
        })
        .collect()
}

/// Tables named in SQL in `code` (after FROM, INTO, UPDATE, ...).
fn tables_named(code: &str) -> BTreeSet<&'static str> {
    let words: Vec<&str> = code
        .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .filter(|w| !w.is_empty())
        .collect();
    let mut named = BTreeSet::new();
    for pair in words.windows(2) {
        if !SQL_LEAD_INS.contains(&pair[0]) {
            continue;
        }
        if let Some((table, _)) = OWNERS.iter().find(|(table, _)| *table == pair[1]) {
            named.insert(*table);
        }
    }
    named
}

#[test]
fn every_table_is_named_in_sql_by_its_owner_only() {
    let mut trespasses = Vec::new();
    for (file, code) in sources() {
        for table in tables_named(&code) {
            let owner = OWNERS
                .iter()
                .find(|(t, _)| *t == table)
                .map(|(_, owner)| *owner)
                .expect("owned table");
            if !file.starts_with(owner) {
                trespasses.push(format!("{file} names `{table}` (owner: {owner})"));
            }
        }
    }
    assert!(
        trespasses.is_empty(),
        "SQL outside the table's owner:\n{}",
        trespasses.join("\n")
    );
}

#[test]
fn the_table_scan_sees_what_it_should() {
    let named = tables_named("sqlx::query(\"UPDATE messages SET x = 1 FROM tasks t\")");
    assert_eq!(named, BTreeSet::from(["messages", "tasks"]));
    assert!(tables_named("the ledger's messages, from tasks").is_empty());
}

/// The top-level module (`src/<module>.rs` or `src/<module>/`) a file belongs to.
fn module_of(file: &str) -> Option<String> {
    let rest = file.strip_prefix("src/")?;
    let name = rest.split('/').next()?.trim_end_matches(".rs");
    (!matches!(name, "lib" | "main")).then(|| name.to_owned())
}

/// Top-level modules a file's code refers to through `crate::`.
fn uses_of(code: &str) -> BTreeSet<String> {
    let mut used = BTreeSet::new();
    for (index, _) in code.match_indices("crate::") {
        let after = &code[index + "crate::".len()..];
        if let Some(inside) = after.strip_prefix('{') {
            // `use crate::{a, b::{c, d}}`: the first segment of each item at the top level.
            used.extend(top_level_items(inside));
        } else {
            let name: String = after
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            if !name.is_empty() {
                used.insert(name);
            }
        }
    }
    used
}

/// The first path segment of each item of a brace group (`a, b::{c, d}}` gives a and b).
fn top_level_items(inside: &str) -> Vec<String> {
    let mut items = Vec::new();
    let mut depth = 0;
    let mut current = String::new();
    let mut take = true;
    for c in inside.chars() {
        match c {
            '{' => depth += 1,
            '}' if depth == 0 => break,
            '}' => depth -= 1,
            ',' if depth == 0 => {
                items.push(std::mem::take(&mut current));
                take = true;
                continue;
            }
            ':' if depth == 0 => take = false,
            _ => {}
        }
        if take && depth == 0 && (c.is_ascii_alphanumeric() || c == '_') {
            current.push(c);
        }
    }
    items.push(current);
    items.into_iter().filter(|item| !item.is_empty()).collect()
}

/// A cycle in `graph`, if there is one, as the modules along it.
fn find_cycle(graph: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
    fn visit(
        node: &str,
        graph: &BTreeMap<String, BTreeSet<String>>,
        path: &mut Vec<String>,
        done: &mut BTreeSet<String>,
    ) -> Option<Vec<String>> {
        if let Some(start) = path.iter().position(|n| n == node) {
            let mut cycle = path[start..].to_vec();
            cycle.push(node.to_owned());
            return Some(cycle);
        }
        if done.contains(node) {
            return None;
        }
        path.push(node.to_owned());
        for next in graph.get(node).into_iter().flatten() {
            if let Some(cycle) = visit(next, graph, path, done) {
                return Some(cycle);
            }
        }
        path.pop();
        done.insert(node.to_owned());
        None
    }
    let mut done = BTreeSet::new();
    graph
        .keys()
        .find_map(|node| visit(node, graph, &mut Vec::new(), &mut done))
}

fn module_graph() -> BTreeMap<String, BTreeSet<String>> {
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (file, code) in sources() {
        let Some(module) = module_of(&file) else {
            continue;
        };
        let uses = uses_of(&code)
            .into_iter()
            .filter(|used| *used != module)
            .collect::<BTreeSet<_>>();
        graph.entry(module).or_default().extend(uses);
    }
    graph
}

#[test]
fn src_modules_depend_on_each_other_without_cycles() {
    let graph = module_graph();
    assert!(graph.contains_key("pipeline") && graph.contains_key("queue"));
    if let Some(cycle) = find_cycle(&graph) {
        panic!("import cycle between src/ modules: {}", cycle.join(" -> "));
    }
}

#[test]
fn the_cycle_finder_finds_cycles() {
    let graph: BTreeMap<String, BTreeSet<String>> = [
        ("a", vec!["b"]),
        ("b", vec!["c"]),
        ("c", vec!["a"]),
        ("d", vec![]),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v.into_iter().map(str::to_owned).collect()))
    .collect();
    assert_eq!(
        find_cycle(&graph),
        Some(vec!["a".into(), "b".into(), "c".into(), "a".into()])
    );
    assert_eq!(
        uses_of("use crate::{ledger, queue::{self, X}};\nlet x = crate::graph::y;"),
        BTreeSet::from(["graph".into(), "ledger".into(), "queue".into()])
    );
}
