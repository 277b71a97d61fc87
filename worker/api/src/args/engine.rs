//! How the engine batches, how much KV cache it keeps, and which device computes.

use std::fmt;
use std::str::FromStr;

/// Where a backend computes: `cpu`, `cuda` (device 0) or `cuda:N`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DeviceSpec {
    #[default]
    Cpu,
    Cuda(usize),
}

impl FromStr for DeviceSpec {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "cpu" => Ok(DeviceSpec::Cpu),
            "cuda" => Ok(DeviceSpec::Cuda(0)),
            _ => match s.strip_prefix("cuda:").map(str::parse::<usize>) {
                Some(Ok(n)) => Ok(DeviceSpec::Cuda(n)),
                _ => Err(format!(
                    "unknown device {s:?}: expected cpu, cuda or cuda:N (N a device ordinal)"
                )),
            },
        }
    }
}

impl fmt::Display for DeviceSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DeviceSpec::Cpu => f.write_str("cpu"),
            DeviceSpec::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

/// Where the weights come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum LoadFormat {
    /// The model's files (GGUF or safetensors).
    #[default]
    Auto,
    /// Random weights (of the model's shape or a named one, see
    /// `--dummy-shape`), generated on the GPU (on the host for `--device
    /// cpu`): benchmarks without downloads.
    Dummy,
}

/// Command-line options choosing and sizing the compute device.
#[derive(Debug, Clone, clap::Args)]
pub struct DeviceArgs {
    /// Where to compute: cpu, cuda (device 0) or cuda:N.
    #[arg(long, env = "TANDEM_DEVICE", default_value = "cpu")]
    pub device: DeviceSpec,
    /// auto: the model's weights; dummy: random weights of the model's shape
    /// or of `--dummy-shape`, with the model's tokenizer: benchmarks without
    /// downloading big checkpoints.
    #[arg(long, env = "TANDEM_LOAD_FORMAT", value_enum, default_value_t = LoadFormat::Auto)]
    pub load_format: LoadFormat,
    /// Named shape for `--load-format dummy`: smollm2-135m, llama3-8b,
    /// llama3-70b, qwen2-7b.
    #[arg(long, env = "TANDEM_DUMMY_SHAPE")]
    pub dummy_shape: Option<String>,
    /// Fraction of the GPU's memory this worker may use: weights and
    /// activations first, the KV pool gets the rest (unless --num-blocks is
    /// given; --kv-cache-memory applies to the CPU only).
    #[arg(long, env = "TANDEM_GPU_MEMORY_UTILIZATION", default_value_t = super::DEFAULT_GPU_MEMORY_UTILIZATION, value_parser = parse_utilization)]
    pub gpu_memory_utilization: f32,
    /// GPUs one worker shards the model over (Megatron-style tensor
    /// parallelism through NCCL): `--device cuda:K` uses GPUs K .. K+N-1.
    #[arg(long, env = "TANDEM_TENSOR_PARALLEL_SIZE", default_value_t = 1, value_parser = parse_tensor_parallel_size)]
    pub tensor_parallel_size: usize,
}

fn parse_tensor_parallel_size(s: &str) -> Result<usize, String> {
    match s.parse::<usize>() {
        Ok(n) if n >= 1 => Ok(n),
        _ => Err(format!("{s:?} is not a number of GPUs (1 or more)")),
    }
}

fn parse_utilization(s: &str) -> Result<f32, String> {
    let v: f32 = s
        .parse()
        .map_err(|_| format!("{s:?} is not a number between 0 and 1"))?;
    if v > 0.0 && v <= 1.0 {
        Ok(v)
    } else {
        Err(format!("{v} is outside (0, 1]"))
    }
}

/// How the engine batches and how much KV cache it keeps.
#[derive(Debug, Clone, clap::Args)]
pub struct EngineArgs {
    /// Memory for the KV cache, e.g. `512MiB`, `2GiB` or a byte count; the
    /// number of blocks follows from the model's KV bytes per token.
    #[arg(long, env = "TANDEM_KV_CACHE_MEMORY", value_parser = parse_byte_size, default_value = super::DEFAULT_KV_CACHE_MEMORY, conflicts_with = "num_blocks")]
    pub kv_cache_memory: u64,

    /// Number of KV cache blocks, instead of `--kv-cache-memory`.
    #[arg(long, env = "TANDEM_NUM_BLOCKS")]
    pub num_blocks: Option<usize>,

    /// Tokens per KV cache block (prefix caching works on whole blocks).
    #[arg(long, env = "TANDEM_BLOCK_SIZE", default_value_t = super::DEFAULT_BLOCK_SIZE)]
    pub block_size: usize,

    /// Most sequences in the running batch at once.
    #[arg(long, env = "TANDEM_MAX_NUM_SEQS", default_value_t = super::DEFAULT_MAX_NUM_SEQS)]
    pub max_num_seqs: usize,

    /// Token budget of one engine step (prompt chunks plus decodes).
    #[arg(long, env = "TANDEM_MAX_BATCH_TOKENS", default_value_t = super::DEFAULT_MAX_BATCH_TOKENS)]
    pub max_batch_tokens: usize,

    /// Requests that may wait for admission; beyond it new requests are refused
    /// (429 from the OpenAI API, RESOURCE_EXHAUSTED over gRPC).
    #[arg(long, env = "TANDEM_MAX_QUEUE", default_value_t = super::DEFAULT_MAX_QUEUE)]
    pub max_queue: usize,

    /// Compute threads; 0 uses one per core.
    #[arg(long, env = "TANDEM_THREADS", default_value_t = super::DEFAULT_THREADS)]
    pub threads: usize,

    #[command(flatten)]
    pub device: DeviceArgs,
}

/// `512MiB`, `2GiB`, `1.5G`, `1000000` → bytes. Binary and decimal suffixes
/// are both accepted (`K`/`KB` = 1000, `Ki`/`KiB` = 1024), case-insensitive.
pub fn parse_byte_size(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (number, unit) = t.split_at(split);
    let value: f64 = number
        .parse()
        .map_err(|_| format!("`{text}` is not a size like 512MiB, 2GiB or 1000000"))?;
    let multiplier: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" => 1_000,
        "ki" | "kib" => 1 << 10,
        "m" | "mb" => 1_000_000,
        "mi" | "mib" => 1 << 20,
        "g" | "gb" => 1_000_000_000,
        "gi" | "gib" => 1 << 30,
        "t" | "tb" => 1_000_000_000_000,
        "ti" | "tib" => 1 << 40,
        other => return Err(format!("unknown size unit `{other}` in `{text}`")),
    };
    let bytes = value * multiplier as f64;
    if bytes < 1.0 {
        return Err(format!("`{text}` is less than one byte"));
    }
    Ok(bytes as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_sizes() {
        assert_eq!(parse_byte_size("512MiB"), Ok(512 << 20));
        assert_eq!(parse_byte_size("2GiB"), Ok(2 << 30));
        assert_eq!(parse_byte_size("1.5G"), Ok(1_500_000_000));
        assert_eq!(parse_byte_size("4096"), Ok(4096));
        assert_eq!(parse_byte_size(" 64 kib "), Ok(64 << 10));
        assert!(parse_byte_size("lots").is_err());
        assert!(parse_byte_size("5 parsecs").is_err());
        assert!(parse_byte_size("0").is_err());
    }

    #[test]
    fn utilization_must_be_a_fraction() {
        assert_eq!(parse_utilization("0.85"), Ok(0.85));
        assert!(parse_utilization("0").is_err());
        assert!(parse_utilization("1.5").unwrap_err().contains("outside"));
        assert!(parse_utilization("most")
            .unwrap_err()
            .contains("not a number"));
    }
}
