//! Cutting a batch's rows into model calls (text-embeddings-inference's
//! `next_batch`): at most `max_rows` rows and `max_tokens` padded tokens (rows
//! x the call's longest row) each. Rows go shortest first, so that each call
//! pads to a length close to its rows'. The row cap that an out-of-memory
//! error lowers applies when a call runs ([`super::calls`]).

/// The calls, as indices into `lengths`: every index in exactly one call,
/// shortest rows first (equal lengths keep their order). A row longer than the
/// token budget still gets a call of its own.
pub(crate) fn calls(lengths: &[usize], max_rows: usize, max_tokens: usize) -> Vec<Vec<usize>> {
    let mut order: Vec<usize> = (0..lengths.len()).collect();
    order.sort_by_key(|i| lengths[*i]);
    let mut calls = Vec::new();
    let mut start = 0;
    for (position, &index) in order.iter().enumerate() {
        // Sorted: this row is the longest of the call it would join.
        let rows = position - start + 1;
        if position > start && (rows > max_rows.max(1) || rows.saturating_mul(lengths[index]) > max_tokens) {
            calls.push(order[start..position].to_vec());
            start = position;
        }
    }
    if start < order.len() {
        calls.push(order[start..].to_vec());
    }
    calls
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn calls_respect_rows_and_padded_tokens() {
        // 4 rows at most, 40 padded tokens at most.
        let lengths = [3, 5, 8, 9, 10, 12, 30, 60];
        let cut = calls(&lengths, 4, 40);
        assert_eq!(cut, vec![vec![0, 1, 2, 3], vec![4, 5], vec![6], vec![7]]);
        for call in &cut {
            let padded = call.len() * call.iter().map(|i| lengths[*i]).max().unwrap_or(0);
            assert!(call.len() <= 4 && (padded <= 40 || call.len() == 1), "{call:?}: {padded} tokens");
        }
        assert_eq!(calls(&[], 4, 40), Vec::<Vec<usize>>::new());
        assert_eq!(calls(&[200], 4, 40), vec![vec![0]], "a row over the budget still gets a call");
    }

    #[test]
    fn rows_go_shortest_first_and_windows_keep_their_order() {
        assert_eq!(calls(&[9, 2, 5, 2], 8, 1000), vec![vec![1, 3, 2, 0]]);
        // Windows: every row of length 1, no token budget: batch order, cut by rows.
        assert_eq!(calls(&[1; 5], 2, usize::MAX), vec![vec![0, 1], vec![2, 3], vec![4]]);
    }
}
