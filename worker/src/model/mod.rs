//! Model files: configuration, weights, tokenizer and chat template.

pub mod config;
pub mod weights;

pub use config::{Architecture, ModelConfig};
pub use weights::{LayerWeights, Tensor, Weights};
pub mod chat;
pub mod tokenizer;

pub use chat::{ChatMessage, ChatTemplate};
pub use tokenizer::{IncrementalDecoder, Tokenizer};
