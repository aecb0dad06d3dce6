//! The FreeKV CUDA C sources and how each is specialised for NVRTC.
//!
//! The `.cu` files live in `kernels/` at the repository root (CI compile-checks them from there).
//! Each file is compiled as one translation unit: `common.cuh` first (types, vector loads,
//! reductions, the shared descriptor structs), then the file, specialised with `-D` options for one
//! [`KernelConfig`]. NVRTC supplies `cuda_fp16.h` and `cuda_bf16.h` itself, so no CUDA toolkit
//! headers are needed at run time.

use std::fmt;

const COMMON: &str = include_str!("../../../../kernels/common.cuh");

/// One kernel source file. Kernels of one file share a module.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum KernelFile {
    /// `freekv_score_pages`, `freekv_pool_scores`, `freekv_plan_pages`, `freekv_correction`.
    Select,
    /// `freekv_recall_scatter`.
    Transfer,
    /// `freekv_decode_partial`, `freekv_decode_combine`.
    Decode,
}

impl KernelFile {
    /// Every kernel file.
    pub const ALL: [KernelFile; 3] = [Self::Select, Self::Transfer, Self::Decode];

    /// The file's name in `kernels/`.
    pub fn file_name(self) -> &'static str {
        match self {
            Self::Select => "select.cu",
            Self::Transfer => "transfer.cu",
            Self::Decode => "decode.cu",
        }
    }

    fn body(self) -> &'static str {
        match self {
            Self::Select => include_str!("../../../../kernels/select.cu"),
            Self::Transfer => include_str!("../../../../kernels/transfer.cu"),
            Self::Decode => include_str!("../../../../kernels/decode.cu"),
        }
    }

    /// The `extern "C"` kernels this file defines.
    pub fn kernels(self) -> &'static [&'static str] {
        match self {
            Self::Select => &[
                "freekv_score_pages",
                "freekv_pool_scores",
                "freekv_plan_pages",
                "freekv_correction",
            ],
            Self::Transfer => &["freekv_recall_scatter"],
            Self::Decode => &["freekv_decode_partial", "freekv_decode_combine"],
        }
    }

    /// The whole translation unit, with `#line` markers so NVRTC errors name the real file.
    pub fn translation_unit(self) -> String {
        format!(
            "#line 1 \"kernels/common.cuh\"\n{COMMON}\n#line 1 \"kernels/{}\"\n{}",
            self.file_name(),
            self.body()
        )
    }
}

/// Element type of the KV cache, queries, summaries and attention output.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum KernelDtype {
    /// 16-bit IEEE floats.
    F16,
    /// bfloat16.
    Bf16,
}

impl KernelDtype {
    fn define(self) -> u32 {
        match self {
            Self::F16 => 0,
            Self::Bf16 => 1,
        }
    }

    /// Bytes per element.
    pub fn size_bytes(self) -> usize {
        2
    }
}

/// What a compiled module is specialised for. One model uses one configuration.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct KernelConfig {
    /// Element type.
    pub dtype: KernelDtype,
    /// 64, 128 or 256.
    pub head_dim: usize,
    /// Tokens per page: 8, 16 or 32.
    pub page_size: usize,
    /// Query heads per KV head (any value >= 1).
    pub group: usize,
}

/// A configuration the kernels cannot be specialised for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnsupportedConfig(pub String);

impl fmt::Display for UnsupportedConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for UnsupportedConfig {}

impl KernelConfig {
    /// Checks that the kernels can be specialised for this configuration.
    pub fn validate(&self) -> Result<(), UnsupportedConfig> {
        if ![64, 128, 256].contains(&self.head_dim) {
            return Err(UnsupportedConfig(format!(
                "head_dim {} is not supported by the FreeKV CUDA kernels (valid: 64, 128, 256)",
                self.head_dim
            )));
        }
        if ![8, 16, 32].contains(&self.page_size) {
            return Err(UnsupportedConfig(format!(
                "page_size {} is not supported by the FreeKV CUDA kernels (valid: 8, 16, 32)",
                self.page_size
            )));
        }
        if self.group == 0 || self.group > 128 {
            return Err(UnsupportedConfig(format!(
                "GQA group size {} is not supported by the FreeKV CUDA kernels (valid: 1..=128)",
                self.group
            )));
        }
        Ok(())
    }

    /// NVRTC options: the specialisation plus the target: `compute_XY` for PTX, `sm_XY` for
    /// a cubin.
    pub fn nvrtc_options(&self, arch: ComputeCap, image: Image) -> Vec<String> {
        let target = match image {
            Image::Ptx => "compute",
            Image::Cubin => "sm",
        };
        vec![
            format!("--gpu-architecture={target}_{}{}", arch.major, arch.minor),
            "--std=c++17".to_string(),
            "--device-as-default-execution-space".to_string(),
            format!("-DFKV_DTYPE={}", self.dtype.define()),
            format!("-DFKV_HEAD_DIM={}", self.head_dim),
            format!("-DFKV_PAGE={}", self.page_size),
            format!("-DFKV_GROUP={}", self.group),
        ]
    }

    /// A short name for files and logs: `bf16-d128-p32-g4`.
    pub fn tag(&self) -> String {
        let dt = match self.dtype {
            KernelDtype::F16 => "f16",
            KernelDtype::Bf16 => "bf16",
        };
        format!(
            "{dt}-d{}-p{}-g{}",
            self.head_dim, self.page_size, self.group
        )
    }
}

/// A device's compute capability (8.0 = A100, 9.0 = H100/H200).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ComputeCap {
    /// Major version.
    pub major: u32,
    /// Minor version.
    pub minor: u32,
}

impl ComputeCap {
    /// Compute capability 8.0 (A100).
    pub const SM80: ComputeCap = ComputeCap { major: 8, minor: 0 };
    /// Compute capability 9.0 (H100, H200).
    pub const SM90: ComputeCap = ComputeCap { major: 9, minor: 0 };
}

impl fmt::Display for ComputeCap {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sm_{}{}", self.major, self.minor)
    }
}

/// What NVRTC makes of a kernel file.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Image {
    /// Machine code for one architecture: loads on any driver that supports the GPU.
    Cubin,
    /// PTX for a virtual architecture, compiled by the driver when loaded: fails to load on a
    /// driver older than the NVRTC that wrote it.
    Ptx,
}

/// The configurations CI compiles for every architecture: every dtype x head dim at the common
/// group size and page size, plus the group sizes of the models we target.
pub fn ci_matrix() -> Vec<KernelConfig> {
    let mut out = Vec::new();
    for dtype in [KernelDtype::F16, KernelDtype::Bf16] {
        for head_dim in [64, 128, 256] {
            out.push(KernelConfig {
                dtype,
                head_dim,
                page_size: 32,
                group: 4,
            });
        }
    }
    // SmolLM2 (3, d 64), Qwen2.5-7B (7), MHA (1), 8 and a large MQA-like group (tiles > 8 / 16).
    for (group, head_dim, page_size) in [
        (3, 64, 16),
        (7, 128, 32),
        (1, 128, 8),
        (8, 128, 32),
        (20, 128, 32),
    ] {
        out.push(KernelConfig {
            dtype: KernelDtype::Bf16,
            head_dim,
            page_size,
            group,
        });
    }
    out
}
