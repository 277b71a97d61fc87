//! The kernel program: the CUDA C sources of `worker/engine/kernels/` (one
//! file per kernel family on a shared header), compiled by NVRTC once per
//! process, architecture and set of constants, and the kernels loaded from
//! it. The typed launch of each kernel is in [`super::launch`].

use std::collections::HashMap;
use std::sync::{Mutex, OnceLock};

use cudarc::driver::{CudaFunction, CudaModule};
use cudarc::nvrtc::CompileOptions;
use std::sync::Arc;

use super::tuning::CudaTuning;
use super::CudaError;

/// Concatenates kernel files in order, each after a `#line` directive so
/// NVRTC names the file and line of an error.
macro_rules! kernel_program {
    ($($file:literal),* $(,)?) => {
        concat!($("#line 1 \"", $file, "\"\n", include_str!(concat!("../../../kernels/", $file))),*)
    };
}

/// The kernels' CUDA C source as NVRTC compiles it: the files of
/// `worker/engine/kernels/` in this order (a file may use what the ones
/// before it define; NVRTC has no access to them as files at run time).
pub(super) const KERNEL_PROGRAM: &str = kernel_program!(
    "common.cuh",
    "fill.cu",
    "embed_norm.cu",
    "rope.cu",
    "silu.cu",
    "decode_attention.cu",
    "prefill_attention.cu",
    "mma.cuh",
    "prefill_attention_tc.cu",
    "prefill_attention_wg.cu",
    "kv_copy.cu",
    "gemv.cu",
    "sample.cu",
);

/// Token counts the fused small-batch projections are compiled for
/// (`GEMV_KERNELS(M)` in gemv.cu).
pub(crate) const GEMV_TOKENS: [usize; 3] = [1, 2, 4];

/// Index into the `gemv_*` kernels for a step of `tokens` tokens, if one fits.
pub(super) fn gemv_index(tokens: usize) -> Option<usize> {
    GEMV_TOKENS.iter().position(|&m| m == tokens)
}

/// Head dims and GQA group bounds the `decode_attention_v2_{hd}_{g}` kernels
/// are compiled for (decode_attention.cu: 16-byte loads of 8 elements, HD / 8
/// lanes per position, which must divide a warp).
pub(super) const DECODE_V2_HEAD_DIMS: [usize; 3] = [32, 64, 128];
pub(super) const DECODE_V2_GROUPS: [usize; 4] = [1, 2, 4, 8];

/// Index into [`Kernels::decode_attention_v2`] of the kernel for `head_dim`
/// and a GQA group of `group` query heads (the smallest compiled bound that
/// holds it), or `None` where none is compiled.
pub(super) fn decode_v2_index(head_dim: usize, group: usize) -> Option<usize> {
    let h = DECODE_V2_HEAD_DIMS.iter().position(|&d| d == head_dim)?;
    let g = DECODE_V2_GROUPS.iter().position(|&g| g >= group)?;
    Some(h * DECODE_V2_GROUPS.len() + g)
}

/// Every kernel of the program, loaded once per backend.
pub(super) struct Kernels {
    pub fill_uniform_bf16: CudaFunction,
    pub fill_f32: CudaFunction,
    pub embed_gather: CudaFunction,
    pub rms_norm: CudaFunction,
    pub rope_table: CudaFunction,
    pub rope_kv_write: CudaFunction,
    pub silu_mul: CudaFunction,
    pub silu_mul_f32: CudaFunction,
    /// The older decode attention, indexed by head_dim / 32 - 1; compiled
    /// only for the head dims `decode_attention_v2` does not cover.
    pub decode_attention: Vec<Option<CudaFunction>>,
    /// The context-independent decode attention, indexed by
    /// [`decode_v2_index`].
    pub decode_attention_v2: Vec<CudaFunction>,
    pub prefill_attention: CudaFunction,
    pub prefill_attention_tc64: CudaFunction,
    pub prefill_attention_tc128: CudaFunction,
    /// The Hopper (wgmma) prefill attention for head dims 64 and 128, in
    /// that order; compiled only for `sm_90a`.
    pub prefill_attention_wg: Option<[CudaFunction; 2]>,
    /// Fused small-batch projections, indexed by [`gemv_index`] of the
    /// step's token count (1, 2 or 4).
    pub gemv_qkv: Vec<CudaFunction>,
    pub gemv_silu: Vec<CudaFunction>,
    pub gemv_out: Vec<CudaFunction>,
    pub sample_rows: CudaFunction,
    pub kv_gather: CudaFunction,
    pub kv_scatter: CudaFunction,
}

impl Kernels {
    /// Every kernel of `module` (the program compiled for `arch`).
    pub fn load(module: &Arc<CudaModule>, arch: &str) -> Result<Self, CudaError> {
        let f = |name: &str| module.load_function(name);
        Ok(Self {
            fill_uniform_bf16: f("fill_uniform_bf16")?,
            fill_f32: f("fill_f32")?,
            embed_gather: f("embed_gather")?,
            rms_norm: f("rms_norm")?,
            rope_table: f("rope_table")?,
            rope_kv_write: f("rope_kv_write")?,
            silu_mul: f("silu_mul")?,
            silu_mul_f32: f("silu_mul_f32")?,
            decode_attention: (1..=8)
                .map(|pl| {
                    let covered = DECODE_V2_HEAD_DIMS.contains(&(32 * pl));
                    (!covered)
                        .then(|| f(&format!("decode_attention_{pl}")))
                        .transpose()
                })
                .collect::<Result<_, _>>()?,
            decode_attention_v2: DECODE_V2_HEAD_DIMS
                .iter()
                .flat_map(|hd| {
                    DECODE_V2_GROUPS
                        .iter()
                        .map(move |g| format!("decode_attention_v2_{hd}_{g}"))
                })
                .map(|name| f(&name))
                .collect::<Result<_, _>>()?,
            prefill_attention: f("prefill_attention")?,
            prefill_attention_tc64: f("prefill_attention_tc64")?,
            prefill_attention_tc128: f("prefill_attention_tc128")?,
            prefill_attention_wg: if arch == "sm_90a" {
                Some([f("prefill_attention_wg64")?, f("prefill_attention_wg128")?])
            } else {
                None
            },
            gemv_qkv: GEMV_TOKENS
                .iter()
                .map(|m| f(&format!("gemv_qkv_{m}")))
                .collect::<Result<_, _>>()?,
            gemv_silu: GEMV_TOKENS
                .iter()
                .map(|m| f(&format!("gemv_silu_{m}")))
                .collect::<Result<_, _>>()?,
            gemv_out: GEMV_TOKENS
                .iter()
                .map(|m| f(&format!("gemv_out_{m}")))
                .collect::<Result<_, _>>()?,
            sample_rows: f("sample_rows")?,
            kv_gather: f("kv_gather")?,
            kv_scatter: f("kv_scatter")?,
        })
    }

    /// The kernels that may ask for more than 48 KiB of dynamic shared
    /// memory: attention and the fused projections.
    pub fn large_smem(&self) -> impl Iterator<Item = &CudaFunction> {
        self.decode_attention
            .iter()
            .flatten()
            .chain(&self.decode_attention_v2)
            .chain([
                &self.prefill_attention,
                &self.prefill_attention_tc64,
                &self.prefill_attention_tc128,
            ])
            .chain(self.prefill_attention_wg.iter().flatten())
            .chain(self.gemv())
    }

    /// The fused projections.
    pub fn gemv(&self) -> impl Iterator<Item = &CudaFunction> {
        self.gemv_qkv
            .iter()
            .chain(&self.gemv_silu)
            .chain(&self.gemv_out)
    }
}

/// The NVRTC options of the program for `arch` under `tuning`.
fn compile_options(arch: &'static str, tuning: &CudaTuning) -> CompileOptions {
    CompileOptions {
        arch: Some(arch),
        include_paths: vec![tuning.include_dir.clone()],
        options: std::iter::once("--std=c++17".to_string())
            .chain(tuning.kernels.nvrtc_defines())
            .collect(),
        ..Default::default()
    }
}

/// The program's PTX for `arch` with `tuning`'s constants, compiled once per
/// process for each such pair.
pub(super) fn compiled_ptx(arch: &'static str, tuning: &CudaTuning) -> Result<String, CudaError> {
    type Key = (&'static str, Vec<String>, String);
    static CACHE: OnceLock<Mutex<HashMap<Key, String>>> = OnceLock::new();
    let cache = CACHE.get_or_init(Default::default);
    let mut cache = cache.lock().unwrap_or_else(|e| e.into_inner());
    let key = (
        arch,
        tuning.kernels.nvrtc_defines(),
        tuning.include_dir.clone(),
    );
    if let Some(ptx) = cache.get(&key) {
        return Ok(ptx.clone());
    }
    let started = std::time::Instant::now();
    let ptx = cudarc::nvrtc::compile_ptx_with_opts(KERNEL_PROGRAM, compile_options(arch, tuning))
        .map_err(|e| CudaError::Compile(format!("{e:?} (include path {})", tuning.include_dir)))?
        .to_src();
    tracing::info!(
        arch,
        elapsed_ms = started.elapsed().as_millis() as u64,
        "compiled CUDA kernels"
    );
    cache.insert(key, ptx.clone());
    Ok(ptx)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The kernels compile for Hopper and Ampere wherever NVRTC is installed
    /// (compiling needs no GPU). `make test` installs NVRTC and the CUDA
    /// headers from PyPI and sets `TANDEM_REQUIRE_NVRTC`, so there a missing
    /// library fails the test; elsewhere it is skipped with a message.
    #[test]
    fn kernels_compile_with_nvrtc() {
        // SAFETY: only tries to dlopen the library.
        if !unsafe { cudarc::nvrtc::sys::is_culib_present() } {
            assert!(
                std::env::var_os("TANDEM_REQUIRE_NVRTC").is_none(),
                "TANDEM_REQUIRE_NVRTC is set but no libnvrtc.so.13 is on LD_LIBRARY_PATH"
            );
            eprintln!("skipping: no NVRTC library (libnvrtc.so) on this machine");
            return;
        }
        let tuning = CudaTuning::from_env().unwrap();
        for arch in ["sm_90a", "sm_90", "sm_80"] {
            let ptx = compiled_ptx(arch, &tuning).unwrap_or_else(|e| panic!("{arch}: {e}"));
            // wgmma exists only on the architecture-specific Hopper target.
            for name in ["prefill_attention_wg64", "prefill_attention_wg128"] {
                assert_eq!(ptx.contains(name), arch == "sm_90a", "{arch}: {name}");
            }
            for name in [
                "decode_attention_3",
                "decode_attention_8",
                "decode_attention_v2_64_4",
                "decode_attention_v2_128_8",
                "prefill_attention",
                "rope_table",
                "rope_kv_write",
                "silu_mul",
                "silu_mul_f32",
                "gemv_qkv_4",
                "gemv_out_1",
                "sample_rows",
            ] {
                assert!(ptx.contains(name), "{arch} PTX lacks {name}");
            }
        }
        assemble_with_ptxas(&tuning);
    }

    /// A program compiled without the host's constants stops at the first
    /// one it lacks instead of compiling with a guess.
    #[test]
    fn the_program_needs_the_hosts_constants() {
        // SAFETY: only tries to dlopen the library.
        if !unsafe { cudarc::nvrtc::sys::is_culib_present() } {
            eprintln!("skipping: no NVRTC library (libnvrtc.so) on this machine");
            return;
        }
        let tuning = CudaTuning::from_env().unwrap();
        let opts = CompileOptions {
            arch: Some("sm_80"),
            include_paths: vec![tuning.include_dir.clone()],
            options: vec!["--std=c++17".to_string()],
            ..Default::default()
        };
        let err = cudarc::nvrtc::compile_ptx_with_opts(KERNEL_PROGRAM, opts).unwrap_err();
        assert!(format!("{err:?}").contains("RMS_VEC"), "{err:?}");
    }

    /// NVRTC passes inline PTX (wgmma, cp.async, ldmatrix) through unchecked;
    /// ptxas, which the driver runs at load time, is what rejects a mistake.
    /// With `$TANDEM_PTXAS` (set by `make test`) the sm_90a PTX is assembled
    /// here too, so such a mistake fails CI instead of a GPU machine.
    fn assemble_with_ptxas(tuning: &CudaTuning) {
        let Some(ptxas) = std::env::var_os("TANDEM_PTXAS") else {
            eprintln!("skipping ptxas: TANDEM_PTXAS is not set");
            return;
        };
        let dir = std::env::temp_dir().join(format!("tandem-ptxas-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let ptx_path = dir.join("kernels.ptx");
        std::fs::write(&ptx_path, compiled_ptx("sm_90a", tuning).unwrap()).unwrap();
        let out = std::process::Command::new(&ptxas)
            .args(["-arch=sm_90a", "-v", "-o"])
            .arg(dir.join("kernels.cubin"))
            .arg(&ptx_path)
            .output()
            .unwrap_or_else(|e| panic!("running {}: {e}", ptxas.to_string_lossy()));
        let log = String::from_utf8_lossy(&out.stderr);
        std::fs::remove_dir_all(&dir).ok();
        assert!(
            out.status.success(),
            "ptxas rejected the sm_90a PTX:\n{log}"
        );
        assert!(log.contains("prefill_attention_wg128"), "{log}");
    }
}
