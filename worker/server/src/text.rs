//! Generated token ids → the text a client sees, with stop strings applied.
//!
//! Stop strings are matched on text, not tokens: one stop string may span
//! several tokens, and one token may hold the end of the answer plus the start
//! of a stop string. So text that could be the beginning of a stop string is
//! held back until the next tokens decide it; once a stop string appears, the
//! output ends just before it.

use tandem_model::{IncrementalDecoder, Tokenizer};

/// Text-level stop-string detection over a stream of text pieces.
#[derive(Debug, Clone)]
pub struct StopMatcher {
    stop_strings: Vec<String>,
    /// Text received but not yet released: a suffix that may start a stop string.
    held: String,
    stopped: bool,
}

/// What a piece of text released.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Released {
    /// Text safe to show the client now (possibly empty).
    pub text: String,
    /// A stop string matched; `text` ends just before it and nothing follows.
    pub stopped: bool,
}

impl StopMatcher {
    /// Empty stop strings must be filtered out by the caller (they would match
    /// at once); they are ignored here.
    pub fn new(stop_strings: Vec<String>) -> Self {
        Self {
            stop_strings: stop_strings.into_iter().filter(|s| !s.is_empty()).collect(),
            held: String::new(),
            stopped: false,
        }
    }

    /// Feed the next piece of text.
    pub fn push(&mut self, piece: &str) -> Released {
        if self.stopped {
            return Released {
                text: String::new(),
                stopped: true,
            };
        }
        self.held.push_str(piece);
        if let Some(at) = self.earliest_match() {
            self.stopped = true;
            let mut text = std::mem::take(&mut self.held);
            text.truncate(at);
            return Released {
                text,
                stopped: true,
            };
        }
        let keep_from = self.undecided_suffix_start();
        let rest = self.held.split_off(keep_from);
        let text = std::mem::replace(&mut self.held, rest);
        Released {
            text,
            stopped: false,
        }
    }

    /// The generation ended: whatever is held back was not a stop string.
    pub fn finish(&mut self) -> String {
        if self.stopped {
            return String::new();
        }
        std::mem::take(&mut self.held)
    }

    pub fn stopped(&self) -> bool {
        self.stopped
    }

    fn earliest_match(&self) -> Option<usize> {
        self.stop_strings
            .iter()
            .filter_map(|s| self.held.find(s.as_str()))
            .min()
    }

    /// Where the longest suffix of `held` that is a proper prefix of some stop
    /// string begins (`held.len()` when there is none).
    fn undecided_suffix_start(&self) -> usize {
        let longest_stop = self.stop_strings.iter().map(String::len).max().unwrap_or(0);
        let earliest = self.held.len().saturating_sub(longest_stop);
        self.held
            .char_indices()
            .map(|(i, _)| i)
            .filter(|&i| i >= earliest)
            .find(|&i| {
                let suffix = &self.held[i..];
                self.stop_strings
                    .iter()
                    .any(|s| s.len() > suffix.len() && s.starts_with(suffix))
            })
            .unwrap_or(self.held.len())
    }
}

/// Token ids → released text: incremental UTF-8-safe decoding, then stop strings.
pub struct TextAssembler {
    decoder: IncrementalDecoder,
    matcher: StopMatcher,
}

impl TextAssembler {
    pub fn new(tokenizer: &Tokenizer, stop_strings: Vec<String>) -> Self {
        Self {
            decoder: tokenizer.incremental(),
            matcher: StopMatcher::new(stop_strings),
        }
    }

    pub fn push(&mut self, token_id: u32) -> Released {
        let piece = self.decoder.push(token_id);
        self.matcher.push(&piece)
    }

    /// The generation ended by itself: release what the decoder and the
    /// matcher still hold (a stop string may still complete in the decoder's tail).
    pub fn finish(&mut self) -> Released {
        let tail = self.decoder.flush();
        let mut released = self.matcher.push(&tail);
        if !released.stopped {
            released.text.push_str(&self.matcher.finish());
        }
        released
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn feed(m: &mut StopMatcher, pieces: &[&str]) -> (String, bool) {
        let mut out = String::new();
        for p in pieces {
            let r = m.push(p);
            out.push_str(&r.text);
            if r.stopped {
                return (out, true);
            }
        }
        out.push_str(&m.finish());
        (out, false)
    }

    #[test]
    fn without_stop_strings_text_passes_through_at_once() {
        let mut m = StopMatcher::new(vec![]);
        assert_eq!(m.push("Hello").text, "Hello");
        assert_eq!(m.push(" world").text, " world");
    }

    #[test]
    fn stop_string_split_across_pieces_truncates_before_it() {
        let mut m = StopMatcher::new(vec!["STOP".into()]);
        assert_eq!(
            feed(&mut m, &["Hi th", "ere S", "TO", "P and more"]),
            ("Hi there ".into(), true)
        );
    }

    #[test]
    fn text_that_only_looks_like_a_stop_start_is_released_later() {
        let mut m = StopMatcher::new(vec!["STOP".into()]);
        let r = m.push("a ST");
        assert_eq!(r.text, "a ");
        let r = m.push("ART");
        assert_eq!(r.text, "START");
        assert!(!r.stopped);
    }

    #[test]
    fn held_text_is_released_when_generation_ends() {
        let mut m = StopMatcher::new(vec!["\n\n".into()]);
        assert_eq!(feed(&mut m, &["line\n"]), ("line\n".into(), false));
    }

    #[test]
    fn earliest_of_several_stop_strings_wins() {
        let mut m = StopMatcher::new(vec!["world".into(), "o w".into()]);
        assert_eq!(feed(&mut m, &["hello world"]), ("hell".into(), true));
    }

    #[test]
    fn stop_string_inside_one_piece() {
        let mut m = StopMatcher::new(vec!["</s>".into()]);
        assert_eq!(feed(&mut m, &["ok</s>tail"]), ("ok".into(), true));
    }

    #[test]
    fn multibyte_text_is_held_on_char_boundaries() {
        let mut m = StopMatcher::new(vec!["ééX".into()]);
        let r = m.push("café");
        assert_eq!(r.text, "caf");
        let r = m.push("é!");
        assert_eq!(r.text, "éé!");
    }

    #[test]
    fn nothing_after_a_stop() {
        let mut m = StopMatcher::new(vec!["x".into()]);
        assert!(m.push("ax").stopped);
        assert_eq!(m.push("more").text, "");
        assert_eq!(m.finish(), "");
    }
}
