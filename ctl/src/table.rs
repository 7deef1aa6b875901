//! Aligned text tables for `--output table`.
//!
//! Columns are as wide as their widest cell and separated by two spaces;
//! the last column is not padded, so lines carry no trailing blanks. Kept
//! here rather than pulled from a crate: it is a few lines, and the
//! output is part of what users read every day.

/// A table being built: a header and rows of cells.
#[derive(Debug, Clone)]
pub struct Table {
    header: Vec<String>,
    rows: Vec<Vec<String>>,
}

impl Table {
    /// A table with these column names.
    pub fn new<I, S>(header: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        Self {
            header: header.into_iter().map(Into::into).collect(),
            rows: Vec::new(),
        }
    }

    /// Adds a row; missing cells are empty, extra cells are kept.
    pub fn row<I, S>(&mut self, cells: I) -> &mut Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.rows.push(cells.into_iter().map(Into::into).collect());
        self
    }

    /// How many rows (without the header).
    pub fn len(&self) -> usize {
        self.rows.len()
    }

    /// Whether the table has no rows.
    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    /// The table as text, one line per row, each ending in a newline.
    pub fn render(&self) -> String {
        let columns = std::iter::once(&self.header)
            .chain(&self.rows)
            .map(Vec::len)
            .max()
            .unwrap_or(0);
        let mut widths = vec![0usize; columns];
        for line in std::iter::once(&self.header).chain(&self.rows) {
            for (i, cell) in line.iter().enumerate() {
                widths[i] = widths[i].max(cell.chars().count());
            }
        }
        let mut out = String::new();
        for line in std::iter::once(&self.header).chain(&self.rows) {
            let mut text = String::new();
            for (i, width) in widths.iter().enumerate() {
                let cell = line.get(i).map(String::as_str).unwrap_or("");
                // Control characters from the server would break the layout.
                let cell: String = cell.chars().map(|c| if c.is_control() { ' ' } else { c }).collect();
                if i > 0 {
                    text.push_str("  ");
                }
                text.push_str(&cell);
                if i + 1 < columns {
                    text.extend(std::iter::repeat_n(' ', width - cell.chars().count()));
                }
            }
            out.push_str(text.trim_end());
            out.push('\n');
        }
        out
    }
}

/// Key/value lines (`key:  value`), aligned on the values.
pub fn pairs(pairs: &[(&str, String)]) -> String {
    let width = pairs.iter().map(|(key, _)| key.chars().count()).max().unwrap_or(0);
    let mut out = String::new();
    for (key, value) in pairs {
        out.push_str(&format!(
            "{key}:{:pad$}  {value}\n",
            "",
            pad = width - key.chars().count()
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn columns_align_and_lines_have_no_trailing_blanks() {
        let mut table = Table::new(["NAME", "KIND", "VALUE"]);
        table.row(["db", "image", "sha256:abc"]);
        table.row(["office-net", "subnet", ""]);
        table.row(["x"]);
        assert_eq!(
            table.render(),
            "NAME        KIND    VALUE\n\
             db          image   sha256:abc\n\
             office-net  subnet\n\
             x\n"
        );
        assert_eq!(table.len(), 3);
    }

    #[test]
    fn unicode_and_control_characters() {
        let mut table = Table::new(["A", "B"]);
        table.row(["ünï", "x\ny"]);
        assert_eq!(table.render(), "A    B\nünï  x y\n");
    }

    #[test]
    fn key_value_pairs() {
        assert_eq!(
            pairs(&[("mode", "alert".to_owned()), ("host mode", "disabled".to_owned())]),
            "mode:       alert\nhost mode:  disabled\n"
        );
    }
}
