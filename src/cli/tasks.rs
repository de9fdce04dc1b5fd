//! `mailpoll tasks`: the task queue for people, as a table or one task in full.

use std::collections::HashMap;

use uuid::Uuid;

use super::table::{self, cell, time};
use crate::queue::{TaskRow, TaskState};

/// Renders tasks as an aligned table; `owners` names the MailboxPoll of each owner uid.
pub fn render_table(tasks: &[TaskRow], owners: &HashMap<Uuid, String>) -> String {
    let rows: Vec<[String; 9]> = tasks
        .iter()
        .map(|task| {
            [
                task.id.to_string(),
                task.kind.clone(),
                state(task),
                owner(task, owners),
                format!("{}/{}", task.attempts, task.max_attempts),
                time(Some(task.run_at)),
                time(Some(task.updated_at)),
                cell(task.locked_by.as_deref()),
                cell(task.last_error.as_deref()),
            ]
        })
        .collect();
    table::render(
        [
            "ID",
            "KIND",
            "STATE",
            "MAILBOXPOLL",
            "ATTEMPTS",
            "RUN AT",
            "UPDATED",
            "WORKER",
            "LAST ERROR",
        ],
        &rows,
    )
}

/// One task in full: every field, the payload as JSON and the last error whole.
pub fn render_task(task: &TaskRow, owners: &HashMap<Uuid, String>) -> String {
    let payload =
        serde_json::to_string_pretty(&task.payload).unwrap_or_else(|_| task.payload.to_string());
    let fields = [
        ("ID", task.id.to_string()),
        ("Kind", task.kind.clone()),
        ("State", state_in_full(task)),
        ("MailboxPoll", owner(task, owners)),
        (
            "Owner uid",
            cell(task.owner_uid.map(|u| u.to_string()).as_deref()),
        ),
        ("Dedupe key", cell(task.dedupe_key.as_deref())),
        (
            "Attempts",
            format!("{}/{}", task.attempts, task.max_attempts),
        ),
        ("Run at", time(Some(task.run_at))),
        ("Worker", cell(task.locked_by.as_deref())),
        ("Lease expires", time(task.lease_expires_at)),
        ("Created", time(Some(task.created_at))),
        ("Updated", time(Some(task.updated_at))),
        ("Finished", time(task.finished_at)),
    ];
    let mut out = String::new();
    for (name, value) in fields {
        out.push_str(&format!("{:<15}{value}\n", format!("{name}:")));
    }
    out.push_str("Last error:\n");
    out.push_str(&indent(task.last_error.as_deref().unwrap_or("-")));
    out.push_str("Payload:\n");
    out.push_str(&indent(&payload));
    out
}

/// The state, and for a task waiting for a slot of its MailboxPoll, the cap it waits behind.
fn state(task: &TaskRow) -> String {
    match task.waiting_cap {
        Some(cap) if task.state == TaskState::Pending => format!("pending, cap {cap}"),
        _ => task.state.to_string(),
    }
}

fn state_in_full(task: &TaskRow) -> String {
    match task.waiting_cap {
        Some(cap) if task.state == TaskState::Pending => format!(
            "pending, waiting for a free slot: its MailboxPoll runs {cap} tasks of this kind at once (its cap) already"
        ),
        _ => task.state.to_string(),
    }
}

fn owner(task: &TaskRow, owners: &HashMap<Uuid, String>) -> String {
    match task.owner_uid {
        Some(uid) => owners.get(&uid).cloned().unwrap_or_else(|| uid.to_string()),
        None => "-".into(),
    }
}

/// Text indented by two spaces, control characters (but line breaks) made visible-safe.
fn indent(text: &str) -> String {
    text.lines()
        .map(|line| {
            let safe: String = line
                .chars()
                .map(|c| if c.is_control() { ' ' } else { c })
                .collect();
            format!("  {safe}\n")
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use chrono::{DateTime, Utc};

    use super::*;

    fn row(id: i64, state: TaskState, error: Option<&str>) -> TaskRow {
        let at = DateTime::parse_from_rfc3339("2026-11-30T10:00:00Z")
            .expect("valid time")
            .with_timezone(&Utc);
        TaskRow {
            id,
            kind: "deliver".into(),
            state,
            payload: serde_json::json!({"mailbox_uid": "x", "message_id": "AAk="}),
            owner_uid: Some(Uuid::nil()),
            dedupe_key: None,
            run_at: at,
            attempts: 3,
            max_attempts: 3,
            locked_by: Some("mailpoll-0/abc".into()),
            lease_expires_at: None,
            last_error: error.map(str::to_owned),
            created_at: at,
            updated_at: at,
            finished_at: Some(at),
            waiting_cap: None,
        }
    }

    fn owners() -> HashMap<Uuid, String> {
        HashMap::from([(Uuid::nil(), "support/support-inbox".to_string())])
    }

    #[test]
    fn table_aligns_columns_names_the_mailbox_poll_and_flattens_errors() {
        let table = render_table(
            &[
                row(7, TaskState::Dead, Some("webhook returned 500\nbody: oops")),
                row(12345, TaskState::Succeeded, None),
            ],
            &owners(),
        );
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(lines.len(), 3);
        assert!(lines[0].starts_with("ID     KIND     STATE      MAILBOXPOLL "));
        assert!(lines[1].starts_with("7      deliver  dead       support/support-inbox  3/3 "));
        assert!(lines[1].ends_with("webhook returned 500 body: oops"));
        assert!(lines[1].contains("2026-11-30T10:00:00Z"));
        assert!(lines[2].ends_with(" -"));
    }

    #[test]
    fn long_errors_are_cut_in_the_table_and_whole_in_show() {
        let long = "x".repeat(500);
        let task = row(1, TaskState::Dead, Some(&long));
        let table = render_table(std::slice::from_ref(&task), &owners());
        let last_cell = table.lines().nth(1).and_then(|l| l.split("  ").last());
        assert_eq!(
            last_cell.map(|c| c.chars().count()),
            Some(table::CELL_WIDTH)
        );
        let shown = render_task(&task, &HashMap::new());
        assert!(shown.contains(&long), "{shown}");
        assert!(shown.contains("MailboxPoll:   00000000-0000-0000-0000-000000000000"));
        assert!(shown.contains("\"message_id\": \"AAk=\""), "{shown}");
    }

    #[test]
    fn a_task_waiting_for_a_slot_says_so() {
        let task = TaskRow {
            waiting_cap: Some(8),
            finished_at: None,
            ..row(3, TaskState::Pending, None)
        };
        let table = render_table(std::slice::from_ref(&task), &owners());
        assert!(
            table
                .lines()
                .nth(1)
                .is_some_and(|line| line.contains("  pending, cap 8  ")),
            "{table}"
        );
        let shown = render_task(&task, &owners());
        assert!(
            shown.contains(
                "State:         pending, waiting for a free slot: its MailboxPoll runs 8"
            ),
            "{shown}"
        );
    }

    #[test]
    fn empty_list_prints_the_header() {
        assert_eq!(render_table(&[], &HashMap::new()).lines().count(), 1);
    }
}
