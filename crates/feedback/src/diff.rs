//! Line (unified) and word diffs between an original response and an annotator's
//! correction, stored next to the corrected text.

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    Keep,
    Del,
    Ins,
}

/// Edit script between two token sequences: common prefix/suffix are trimmed, the middle
/// is aligned by longest common subsequence. Middles too large for the quadratic table
/// (over ~4M cells) become one replacement, which is still a correct (if coarse) diff.
fn edit_script<'a>(a: &[&'a str], b: &[&'a str]) -> Vec<(Op, &'a str)> {
    let pre = a.iter().zip(b).take_while(|(x, y)| x == y).count();
    let suf = a[pre..]
        .iter()
        .rev()
        .zip(b[pre..].iter().rev())
        .take_while(|(x, y)| x == y)
        .count();
    let (am, bm) = (&a[pre..a.len() - suf], &b[pre..b.len() - suf]);
    let mut out: Vec<(Op, &str)> = a[..pre].iter().map(|t| (Op::Keep, *t)).collect();
    if am.len().saturating_mul(bm.len()) > 4_000_000 {
        out.extend(am.iter().map(|t| (Op::Del, *t)));
        out.extend(bm.iter().map(|t| (Op::Ins, *t)));
    } else {
        let (n, m) = (am.len(), bm.len());
        // lcs[i][j] = LCS length of am[i..], bm[j..]
        let mut lcs = vec![0u32; (n + 1) * (m + 1)];
        for i in (0..n).rev() {
            for j in (0..m).rev() {
                lcs[i * (m + 1) + j] = if am[i] == bm[j] {
                    lcs[(i + 1) * (m + 1) + j + 1] + 1
                } else {
                    lcs[(i + 1) * (m + 1) + j].max(lcs[i * (m + 1) + j + 1])
                };
            }
        }
        let (mut i, mut j) = (0, 0);
        while i < n || j < m {
            if i < n && j < m && am[i] == bm[j] {
                out.push((Op::Keep, am[i]));
                i += 1;
                j += 1;
            } else if i < n && (j == m || lcs[(i + 1) * (m + 1) + j] >= lcs[i * (m + 1) + j + 1]) {
                // Deletions first, as diff(1) and git print them.
                out.push((Op::Del, am[i]));
                i += 1;
            } else {
                out.push((Op::Ins, bm[j]));
                j += 1;
            }
        }
    }
    out.extend(a[a.len() - suf..].iter().map(|t| (Op::Keep, *t)));
    out
}

/// Unified diff (3 lines of context) in the usual `---/+++/@@` format; empty when equal.
pub fn unified_diff(original: &str, corrected: &str) -> String {
    let a: Vec<&str> = original.lines().collect();
    let b: Vec<&str> = corrected.lines().collect();
    let script = edit_script(&a, &b);
    if script.iter().all(|(op, _)| *op == Op::Keep) {
        return String::new();
    }
    const CTX: usize = 3;
    // Positions (in the script) of changes, grouped into hunks when close together.
    let changes: Vec<usize> = script
        .iter()
        .enumerate()
        .filter(|(_, (op, _))| *op != Op::Keep)
        .map(|(i, _)| i)
        .collect();
    let mut hunks: Vec<(usize, usize)> = Vec::new();
    for &c in &changes {
        let (s, e) = (c.saturating_sub(CTX), (c + CTX + 1).min(script.len()));
        match hunks.last_mut() {
            Some(h) if s <= h.1 => h.1 = e,
            _ => hunks.push((s, e)),
        }
    }
    let mut out = String::from("--- original\n+++ corrected\n");
    for (s, e) in hunks {
        // Line numbers where the hunk starts in each file.
        let a_start = script[..s].iter().filter(|(op, _)| *op != Op::Ins).count();
        let b_start = script[..s].iter().filter(|(op, _)| *op != Op::Del).count();
        let a_len = script[s..e].iter().filter(|(op, _)| *op != Op::Ins).count();
        let b_len = script[s..e].iter().filter(|(op, _)| *op != Op::Del).count();
        let start = |st: usize, len: usize| if len == 0 { st } else { st + 1 };
        out.push_str(&format!(
            "@@ -{},{} +{},{} @@\n",
            start(a_start, a_len),
            a_len,
            start(b_start, b_len),
            b_len
        ));
        for (op, line) in &script[s..e] {
            let sign = match op {
                Op::Keep => ' ',
                Op::Del => '-',
                Op::Ins => '+',
            };
            out.push(sign);
            out.push_str(line);
            out.push('\n');
        }
    }
    out
}

/// Word diff in `git diff --word-diff=plain` style: `[-removed-]{+added+}`; whitespace
/// runs are tokens too, so the corrected text is exactly recoverable.
pub fn word_diff(original: &str, corrected: &str) -> String {
    let a = tokens(original);
    let b = tokens(corrected);
    let mut out = String::new();
    let mut pending: Option<Op> = None;
    for (op, tok) in edit_script(&a, &b) {
        if pending != Some(op) {
            close(&mut out, pending);
            match op {
                Op::Del => out.push_str("[-"),
                Op::Ins => out.push_str("{+"),
                Op::Keep => {}
            }
            pending = Some(op);
        }
        out.push_str(tok);
    }
    close(&mut out, pending);
    out
}

fn close(out: &mut String, op: Option<Op>) {
    match op {
        Some(Op::Del) => out.push_str("-]"),
        Some(Op::Ins) => out.push_str("+}"),
        _ => {}
    }
}

fn tokens(s: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let mut start = 0;
    let mut prev_ws: Option<bool> = None;
    for (i, c) in s.char_indices() {
        let ws = c.is_whitespace();
        if prev_ws.is_some_and(|p| p != ws) {
            out.push(&s[start..i]);
            start = i;
        }
        prev_ws = Some(ws);
    }
    if start < s.len() {
        out.push(&s[start..]);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unified() {
        let a = "one\ntwo\nthree\nfour\n";
        let b = "one\n2\nthree\nfour\nfive\n";
        assert_eq!(
            unified_diff(a, b),
            "--- original\n+++ corrected\n@@ -1,4 +1,5 @@\n one\n-two\n+2\n three\n four\n+five\n"
        );
        assert_eq!(unified_diff(a, a), "");
    }

    #[test]
    fn unified_separate_hunks() {
        let a: String = (1..=20).map(|i| format!("{i}\n")).collect();
        let b: String = (1..=20)
            .map(|i| match i {
                2 => "two\n".to_string(),
                19 => "nineteen\n".to_string(),
                _ => format!("{i}\n"),
            })
            .collect();
        let d = unified_diff(&a, &b);
        assert_eq!(d.matches("@@ -").count(), 2, "{d}");
        assert!(d.contains("@@ -1,5 +1,5 @@\n 1\n-2\n+two\n"), "{d}");
        assert!(
            d.contains("@@ -16,5 +16,5 @@\n 16\n 17\n 18\n-19\n+nineteen\n 20\n"),
            "{d}"
        );
    }

    #[test]
    fn words() {
        assert_eq!(
            word_diff(
                "The capital of France is Lyon.",
                "The capital of France is Paris."
            ),
            "The capital of France is [-Lyon.-]{+Paris.+}"
        );
        assert_eq!(word_diff("a b", "a b"), "a b");
        assert_eq!(word_diff("", "new"), "{+new+}");
    }
}
