//! Aligned text tables for people, as `kubectl get` prints them.

/// Longest cell; longer text (errors, subjects) is cut with an ellipsis. `--output json`
/// shows everything whole.
pub const CELL_WIDTH: usize = 100;

/// Renders `rows` under `header`, columns two spaces apart, the last one unpadded.
pub fn render<const N: usize>(header: [&str; N], rows: &[[String; N]]) -> String {
    let mut widths = header.map(|h| h.chars().count());
    for row in rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let mut line = |cells: [&str; N]| {
        for (i, cell) in cells.iter().enumerate() {
            out.push_str(cell);
            if i + 1 < N {
                let pad = widths[i] - cell.chars().count() + 2;
                out.extend(std::iter::repeat_n(' ', pad));
            }
        }
        out.push('\n');
    };
    line(header);
    for row in rows {
        line(row.each_ref().map(String::as_str));
    }
    out
}

/// Text for one cell: on one line (control characters, including a terminal escape from a
/// hostile subject or receiver, become spaces), cut to [`CELL_WIDTH`], `-` when absent.
pub fn cell(text: Option<&str>) -> String {
    let Some(text) = text else {
        return "-".into();
    };
    let flat: String = text
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    if flat.chars().count() <= CELL_WIDTH {
        flat
    } else {
        let mut cut: String = flat.chars().take(CELL_WIDTH - 1).collect();
        cut.push('…');
        cut
    }
}

/// A time as RFC 3339 in whole seconds, `-` when absent.
pub fn time(at: Option<chrono::DateTime<chrono::Utc>>) -> String {
    at.map_or_else(
        || "-".into(),
        |at| at.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn columns_align_and_the_last_is_unpadded() {
        let table = render(
            ["ID", "NAME"],
            &[["1".into(), "a".into()], ["12345".into(), "bb".into()]],
        );
        assert_eq!(table, "ID     NAME\n1      a\n12345  bb\n");
    }

    #[test]
    fn cells_are_one_line_and_cut() {
        assert_eq!(cell(Some("a\nb\u{1b}[31mc")), "a b [31mc");
        assert_eq!(cell(None), "-");
        let long = "x".repeat(500);
        assert_eq!(cell(Some(&long)).chars().count(), CELL_WIDTH);
        assert!(cell(Some(&long)).ends_with('…'));
    }
}
