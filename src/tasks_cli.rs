//! `mailpoll tasks`: the task queue for people, as a table.

use chrono::{DateTime, SecondsFormat, Utc};

use crate::queue::TaskRow;

/// Longest error shown in a table cell; `--output json` shows errors whole.
const ERROR_WIDTH: usize = 100;

/// Renders tasks as an aligned text table with a header line.
pub fn render_table(tasks: &[TaskRow]) -> String {
    let header = [
        "ID",
        "KIND",
        "STATE",
        "ATTEMPTS",
        "RUN AT",
        "UPDATED",
        "WORKER",
        "LAST ERROR",
    ];
    let rows: Vec<[String; 8]> = tasks
        .iter()
        .map(|task| {
            [
                task.id.to_string(),
                task.kind.clone(),
                task.state.to_string(),
                format!("{}/{}", task.attempts, task.max_attempts),
                time(task.run_at),
                time(task.updated_at),
                task.locked_by.clone().unwrap_or_else(|| "-".into()),
                task.last_error
                    .as_deref()
                    .map(one_line)
                    .unwrap_or_else(|| "-".into()),
            ]
        })
        .collect();
    let mut widths = header.map(str::len);
    for row in &rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let mut line = |cells: Vec<&str>| {
        let last = cells.len() - 1;
        for (i, cell) in cells.iter().enumerate() {
            out.push_str(cell);
            if i < last {
                let pad = widths[i] - cell.chars().count() + 2;
                out.extend(std::iter::repeat_n(' ', pad));
            }
        }
        out.push('\n');
    };
    line(header.to_vec());
    for row in &rows {
        line(row.iter().map(String::as_str).collect());
    }
    out
}

fn time(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Secs, true)
}

/// An error on one line, cut to the cell width.
fn one_line(error: &str) -> String {
    let flat: String = error
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    if flat.chars().count() <= ERROR_WIDTH {
        flat
    } else {
        let mut cut: String = flat.chars().take(ERROR_WIDTH - 1).collect();
        cut.push('…');
        cut
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::queue::TaskState;

    fn row(id: i64, state: TaskState, error: Option<&str>) -> TaskRow {
        let at = DateTime::parse_from_rfc3339("2026-11-30T10:00:00Z")
            .expect("valid time")
            .with_timezone(&Utc);
        TaskRow {
            id,
            kind: "deliver".into(),
            state,
            payload: serde_json::json!({}),
            owner_uid: None,
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
        }
    }

    #[test]
    fn table_aligns_columns_and_flattens_errors() {
        let table = render_table(&[
            row(7, TaskState::Dead, Some("webhook returned 500\nbody: oops")),
            row(12345, TaskState::Succeeded, None),
        ]);
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(lines.len(), 3);
        assert!(lines[0].starts_with("ID     KIND     STATE "));
        assert!(lines[1].starts_with("7      deliver  dead       3/3 "));
        assert!(lines[1].ends_with("webhook returned 500 body: oops"));
        assert!(lines[1].contains("2026-11-30T10:00:00Z"));
        assert!(lines[2].ends_with(" -"));
    }

    #[test]
    fn long_errors_are_cut() {
        let long = "x".repeat(500);
        let table = render_table(&[row(1, TaskState::Dead, Some(&long))]);
        let last_cell = table.lines().nth(1).and_then(|l| l.split("  ").last());
        assert_eq!(last_cell.map(|c| c.chars().count()), Some(ERROR_WIDTH));
    }

    #[test]
    fn empty_list_prints_the_header() {
        assert_eq!(render_table(&[]).lines().count(), 1);
    }
}
