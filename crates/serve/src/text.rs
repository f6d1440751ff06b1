//! Completion text as tokens arrive: what is safe to show so far, and the final text, with stop
//! strings cut off (OpenAI returns the text before the stop sequence) and never half-streamed.

use rlhf_data::Tokenizer;

/// The tokenizer is passed to each call rather than held, so a stream can live in async state.
pub struct TextStream {
    stops: Vec<String>,
    tokens: Vec<u32>,
    /// Bytes of the text already handed out.
    emitted: usize,
}

impl TextStream {
    pub fn new(stops: &[String]) -> Self {
        Self {
            stops: stops.to_vec(),
            tokens: vec![],
            emitted: 0,
        }
    }

    pub fn tokens(&self) -> &[u32] {
        &self.tokens
    }

    /// The completion so far, cut before the first stop string.
    pub fn text(&self, tokenizer: &Tokenizer) -> String {
        let mut text = tokenizer.decode(&self.tokens, true).unwrap_or_default();
        if let Some(cut) = self
            .stops
            .iter()
            .filter_map(|s| text.find(s.as_str()))
            .min()
        {
            text.truncate(cut);
        }
        text
    }

    /// Adds a token; returns the text that became safe to show. Text that could be the start of a
    /// stop string, or an incomplete UTF-8 character, is held back until later tokens settle it.
    pub fn push(&mut self, tokenizer: &Tokenizer, token: u32) -> String {
        self.tokens.push(token);
        let text = self.text(tokenizer);
        let mut end = text.len();
        if text.ends_with('\u{FFFD}') {
            end -= '\u{FFFD}'.len_utf8();
        }
        let held = self
            .stops
            .iter()
            .flat_map(|s| {
                (1..s.len())
                    .filter(|&k| s.is_char_boundary(k))
                    .map(move |k| &s[..k])
            })
            .filter(|p| text[..end].ends_with(p))
            .map(str::len)
            .max()
            .unwrap_or(0);
        self.take(&text, end - held)
    }

    /// The rest of the text once the request has finished.
    pub fn finish(&mut self, tokenizer: &Tokenizer) -> String {
        let text = self.text(tokenizer);
        self.take(&text, text.len())
    }

    fn take(&mut self, text: &str, end: usize) -> String {
        // Decoding more tokens can rewrite earlier text (rarely); never re-send or split a character.
        match text.get(self.emitted..end) {
            Some(delta) if end > self.emitted => {
                self.emitted = end;
                delta.to_string()
            }
            _ => String::new(),
        }
    }
}
