//! The CUDA backend's GPU harnesses, run on a GPU machine from the release
//! binary (`tandem gpu check`, `tandem gpu bench`, `tandem gpu tp-check`)
//! and from the ignored tests: correctness against the CPU backend
//! ([`check`]), tensor parallelism against one GPU ([`tp_check`]), and
//! timings ([`bench`](mod@bench)). They drive [`super::cuda`] through its public API
//! alone (and the crate-visible helpers it lends them).

pub mod bench;
pub mod check;
pub mod tp_check;
