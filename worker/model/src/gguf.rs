//! The GGUF file format (versions 2 and 3): a reader over a memory map and a
//! small writer.
//!
//! Layout: magic `GGUF`, version, tensor count, metadata count; the metadata
//! key/value pairs; one info record per tensor (name, dims with the fastest-
//! varying first, type, offset); padding to `general.alignment` (default 32);
//! then the tensor data, each tensor at an aligned offset from the data start.
//!
//! The writer exists so tests anywhere in the crate can produce real model
//! files (including quantized ones) without downloads; files it writes load in
//! llama.cpp too.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use memmap2::Mmap;

use super::quant::{self, GgmlType, QuantError};

const MAGIC: &[u8; 4] = b"GGUF";
const WRITE_VERSION: u32 = 3;
pub const DEFAULT_ALIGNMENT: u64 = 32;
const ALIGNMENT_KEY: &str = "general.alignment";

#[derive(Debug, thiserror::Error)]
pub enum GgufError {
    #[error("{path}: {cause}")]
    Io {
        path: PathBuf,
        cause: std::io::Error,
    },
    #[error("{path}: not a GGUF file (magic bytes are {found:?}, expected \"GGUF\")")]
    BadMagic { path: PathBuf, found: String },
    #[error("{path}: GGUF version {version} is not supported (only 2 and 3)")]
    UnsupportedVersion { path: PathBuf, version: u32 },
    #[error("{path}: file is truncated or corrupt: {what}")]
    Corrupt { path: PathBuf, what: String },
    #[error("{path}: tensor {name}: {cause}")]
    Tensor {
        path: PathBuf,
        name: String,
        cause: QuantError,
    },
    #[error("{path}: no tensor named {name}")]
    MissingTensor { path: PathBuf, name: String },
    #[error("cannot write GGUF: {0}")]
    Write(String),
}

/// One metadata value. Arrays hold values of a single type.
#[derive(Debug, Clone, PartialEq)]
pub enum MetadataValue {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    F32(f32),
    Bool(bool),
    String(String),
    /// Element type id (as in the file) and the elements.
    Array(ValueType, Vec<MetadataValue>),
    U64(u64),
    I64(i64),
    F64(f64),
}

/// GGUF metadata value type ids.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum ValueType {
    U8 = 0,
    I8 = 1,
    U16 = 2,
    I16 = 3,
    U32 = 4,
    I32 = 5,
    F32 = 6,
    Bool = 7,
    String = 8,
    Array = 9,
    U64 = 10,
    I64 = 11,
    F64 = 12,
}

impl ValueType {
    fn from_id(id: u32) -> Option<Self> {
        use ValueType::*;
        Some(match id {
            0 => U8,
            1 => I8,
            2 => U16,
            3 => I16,
            4 => U32,
            5 => I32,
            6 => F32,
            7 => Bool,
            8 => String,
            9 => Array,
            10 => U64,
            11 => I64,
            12 => F64,
            _ => return None,
        })
    }
}

impl MetadataValue {
    pub fn value_type(&self) -> ValueType {
        match self {
            MetadataValue::U8(_) => ValueType::U8,
            MetadataValue::I8(_) => ValueType::I8,
            MetadataValue::U16(_) => ValueType::U16,
            MetadataValue::I16(_) => ValueType::I16,
            MetadataValue::U32(_) => ValueType::U32,
            MetadataValue::I32(_) => ValueType::I32,
            MetadataValue::F32(_) => ValueType::F32,
            MetadataValue::Bool(_) => ValueType::Bool,
            MetadataValue::String(_) => ValueType::String,
            MetadataValue::Array(..) => ValueType::Array,
            MetadataValue::U64(_) => ValueType::U64,
            MetadataValue::I64(_) => ValueType::I64,
            MetadataValue::F64(_) => ValueType::F64,
        }
    }

    /// An array of strings.
    pub fn strings<S: Into<String>>(items: impl IntoIterator<Item = S>) -> Self {
        MetadataValue::Array(
            ValueType::String,
            items
                .into_iter()
                .map(|s| MetadataValue::String(s.into()))
                .collect(),
        )
    }

    /// An array of i32.
    pub fn i32s(items: impl IntoIterator<Item = i32>) -> Self {
        MetadataValue::Array(
            ValueType::I32,
            items.into_iter().map(MetadataValue::I32).collect(),
        )
    }

    /// Any integer type as u64 (negative values are `None`).
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            MetadataValue::U8(v) => Some(v.into()),
            MetadataValue::U16(v) => Some(v.into()),
            MetadataValue::U32(v) => Some(v.into()),
            MetadataValue::U64(v) => Some(v),
            MetadataValue::I8(v) => u64::try_from(v).ok(),
            MetadataValue::I16(v) => u64::try_from(v).ok(),
            MetadataValue::I32(v) => u64::try_from(v).ok(),
            MetadataValue::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }

    /// Any integer type as i64.
    pub fn as_i64(&self) -> Option<i64> {
        match *self {
            MetadataValue::I8(v) => Some(v.into()),
            MetadataValue::I16(v) => Some(v.into()),
            MetadataValue::I32(v) => Some(v.into()),
            MetadataValue::I64(v) => Some(v),
            _ => self.as_u64().and_then(|v| i64::try_from(v).ok()),
        }
    }

    /// Any float or integer as f64.
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            MetadataValue::F32(v) => Some(v.into()),
            MetadataValue::F64(v) => Some(v),
            _ => self.as_i64().map(|v| v as f64),
        }
    }

    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            MetadataValue::Bool(v) => Some(v),
            _ => None,
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            MetadataValue::String(s) => Some(s),
            _ => None,
        }
    }

    pub fn as_array(&self) -> Option<&[MetadataValue]> {
        match self {
            MetadataValue::Array(_, items) => Some(items),
            _ => None,
        }
    }
}

/// Where one tensor lives in the file.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorInfo {
    pub name: String,
    /// GGUF order: the fastest-varying dimension first (ggml `ne`).
    pub dims: Vec<u64>,
    pub ggml_type: GgmlType,
    /// Offset from the start of the data section.
    pub offset: u64,
}

impl TensorInfo {
    pub fn numel(&self) -> usize {
        self.dims.iter().product::<u64>() as usize
    }

    /// Row-major shape, outermost first: GGUF `[in, out]` becomes `[out, in]`.
    pub fn shape(&self) -> Vec<usize> {
        self.dims.iter().rev().map(|&d| d as usize).collect()
    }
}

/// An open GGUF file: parsed header and metadata, tensor data mapped lazily.
pub struct GgufFile {
    path: PathBuf,
    pub version: u32,
    pub metadata: BTreeMap<String, MetadataValue>,
    pub tensors: Vec<TensorInfo>,
    pub alignment: u64,
    data_start: u64,
    mmap: Mmap,
}

impl std::fmt::Debug for GgufFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GgufFile")
            .field("path", &self.path)
            .field("version", &self.version)
            .field("metadata_keys", &self.metadata.len())
            .field("tensors", &self.tensors.len())
            .finish()
    }
}

struct Cursor<'a> {
    buf: &'a [u8],
    pos: usize,
    path: &'a Path,
}

impl<'a> Cursor<'a> {
    fn corrupt(&self, what: impl Into<String>) -> GgufError {
        GgufError::Corrupt {
            path: self.path.to_path_buf(),
            what: what.into(),
        }
    }

    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8], GgufError> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&e| e <= self.buf.len())
            .ok_or_else(|| {
                self.corrupt(format!(
                    "{what} at byte {} needs {n} bytes past the end of the file",
                    self.pos
                ))
            })?;
        let s = &self.buf[self.pos..end];
        self.pos = end;
        Ok(s)
    }

    fn array<const N: usize>(&mut self, what: &str) -> Result<[u8; N], GgufError> {
        Ok(self
            .take(N, what)?
            .try_into()
            .expect("take returned N bytes"))
    }

    fn u32(&mut self, what: &str) -> Result<u32, GgufError> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }

    fn u64(&mut self, what: &str) -> Result<u64, GgufError> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }

    /// A count that must fit in the rest of the file at `min_item_bytes` each,
    /// so a corrupt length cannot make us allocate wildly.
    fn count(&mut self, what: &str, min_item_bytes: usize) -> Result<usize, GgufError> {
        let n = self.u64(what)?;
        let left = (self.buf.len() - self.pos) as u64;
        if n.saturating_mul(min_item_bytes.max(1) as u64) > left {
            return Err(self.corrupt(format!("{what} is {n}, more than the file can hold")));
        }
        Ok(n as usize)
    }

    fn string(&mut self, what: &str) -> Result<String, GgufError> {
        let len = self.count(what, 1)?;
        let bytes = self.take(len, what)?;
        String::from_utf8(bytes.to_vec())
            .map_err(|_| self.corrupt(format!("{what} is not valid UTF-8")))
    }

    fn value(&mut self, ty: ValueType, key: &str) -> Result<MetadataValue, GgufError> {
        Ok(match ty {
            ValueType::U8 => MetadataValue::U8(self.array::<1>(key)?[0]),
            ValueType::I8 => MetadataValue::I8(self.array::<1>(key)?[0] as i8),
            ValueType::U16 => MetadataValue::U16(u16::from_le_bytes(self.array(key)?)),
            ValueType::I16 => MetadataValue::I16(i16::from_le_bytes(self.array(key)?)),
            ValueType::U32 => MetadataValue::U32(self.u32(key)?),
            ValueType::I32 => MetadataValue::I32(i32::from_le_bytes(self.array(key)?)),
            ValueType::F32 => MetadataValue::F32(f32::from_le_bytes(self.array(key)?)),
            ValueType::Bool => match self.array::<1>(key)?[0] {
                0 => MetadataValue::Bool(false),
                1 => MetadataValue::Bool(true),
                b => return Err(self.corrupt(format!("{key}: bool byte is {b}"))),
            },
            ValueType::String => MetadataValue::String(self.string(key)?),
            ValueType::U64 => MetadataValue::U64(self.u64(key)?),
            ValueType::I64 => MetadataValue::I64(i64::from_le_bytes(self.array(key)?)),
            ValueType::F64 => MetadataValue::F64(f64::from_le_bytes(self.array(key)?)),
            ValueType::Array => {
                let elem_id = self.u32(key)?;
                let elem = ValueType::from_id(elem_id).ok_or_else(|| {
                    self.corrupt(format!("{key}: unknown array element type {elem_id}"))
                })?;
                let n = self.count(key, 1)?;
                let mut items = Vec::with_capacity(n);
                for _ in 0..n {
                    items.push(self.value(elem, key)?);
                }
                MetadataValue::Array(elem, items)
            }
        })
    }
}

fn align_up(x: u64, alignment: u64) -> u64 {
    x.div_ceil(alignment) * alignment
}

impl GgufFile {
    /// Opens and parses `path`. Tensor data is not read until asked for.
    pub fn open(path: &Path) -> Result<Self, GgufError> {
        let io = |cause| GgufError::Io {
            path: path.to_path_buf(),
            cause,
        };
        let file = File::open(path).map_err(io)?;
        // SAFETY: the map is read-only; model files are not modified while served.
        let mmap = unsafe { Mmap::map(&file) }.map_err(io)?;
        let mut c = Cursor {
            buf: &mmap,
            pos: 0,
            path,
        };
        let magic = c.take(4, "magic").map_err(|_| GgufError::BadMagic {
            path: path.to_path_buf(),
            found: String::from_utf8_lossy(&mmap[..mmap.len().min(4)]).into_owned(),
        })?;
        if magic != MAGIC {
            return Err(GgufError::BadMagic {
                path: path.to_path_buf(),
                found: String::from_utf8_lossy(magic).into_owned(),
            });
        }
        let version = c.u32("version")?;
        if !(2..=3).contains(&version) {
            return Err(GgufError::UnsupportedVersion {
                path: path.to_path_buf(),
                version,
            });
        }
        // Each tensor info is at least 8+4+4+8 bytes, each metadata entry 8+4.
        let tensor_count = c.count("tensor count", 24)?;
        let kv_count = c.count("metadata count", 12)?;
        let mut metadata = BTreeMap::new();
        for _ in 0..kv_count {
            let key = c.string("metadata key")?;
            let ty_id = c.u32(&key)?;
            let ty = ValueType::from_id(ty_id)
                .ok_or_else(|| c.corrupt(format!("{key}: unknown value type {ty_id}")))?;
            let value = c.value(ty, &key)?;
            metadata.insert(key, value);
        }
        let mut tensors = Vec::with_capacity(tensor_count);
        for _ in 0..tensor_count {
            let name = c.string("tensor name")?;
            let n_dims = c.u32(&name)?;
            if n_dims > 4 {
                return Err(c.corrupt(format!("tensor {name} has {n_dims} dimensions")));
            }
            let dims = (0..n_dims)
                .map(|_| c.u64(&name))
                .collect::<Result<Vec<_>, _>>()?;
            let ggml_type = GgmlType(c.u32(&name)?);
            let offset = c.u64(&name)?;
            tensors.push(TensorInfo {
                name,
                dims,
                ggml_type,
                offset,
            });
        }
        let alignment = match metadata.get(ALIGNMENT_KEY) {
            None => DEFAULT_ALIGNMENT,
            Some(v) => v
                .as_u64()
                .filter(|a| *a > 0 && a.is_power_of_two())
                .ok_or_else(|| c.corrupt(format!("{ALIGNMENT_KEY} is {v:?}")))?,
        };
        let data_start = align_up(c.pos as u64, alignment);
        let file = Self {
            path: path.to_path_buf(),
            version,
            metadata,
            tensors,
            alignment,
            data_start,
            mmap,
        };
        for t in &file.tensors {
            if t.offset % alignment != 0 {
                return Err(file.corrupt(format!(
                    "tensor {} offset {} is not a multiple of the alignment {alignment}",
                    t.name, t.offset
                )));
            }
            // Bounds of supported types are checked here; unsupported ones are
            // reported by the loader when (and if) it needs them.
            if let Ok(size) = t.ggml_type.byte_size(t.numel()) {
                let end = data_start + t.offset + size as u64;
                if end > file.mmap.len() as u64 {
                    return Err(file.corrupt(format!(
                        "tensor {} ends at byte {end}, past the end of the file ({} bytes)",
                        t.name,
                        file.mmap.len()
                    )));
                }
            }
        }
        Ok(file)
    }

    fn corrupt(&self, what: String) -> GgufError {
        GgufError::Corrupt {
            path: self.path.clone(),
            what,
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn get(&self, key: &str) -> Option<&MetadataValue> {
        self.metadata.get(key)
    }

    pub fn tensor_info(&self, name: &str) -> Option<&TensorInfo> {
        self.tensors.iter().find(|t| t.name == name)
    }

    /// The raw bytes of a tensor, in its stored type.
    pub fn tensor_bytes(&self, info: &TensorInfo) -> Result<&[u8], GgufError> {
        let size = info
            .ggml_type
            .byte_size(info.numel())
            .map_err(|cause| GgufError::Tensor {
                path: self.path.clone(),
                name: info.name.clone(),
                cause,
            })?;
        let start = (self.data_start + info.offset) as usize;
        Ok(&self.mmap[start..start + size])
    }

    /// A tensor decoded to f32 (row-major, shape [`TensorInfo::shape`]).
    pub fn tensor_f32(&self, name: &str) -> Result<(Vec<usize>, Vec<f32>), GgufError> {
        let info = self
            .tensor_info(name)
            .ok_or_else(|| GgufError::MissingTensor {
                path: self.path.clone(),
                name: name.to_string(),
            })?;
        let bytes = self.tensor_bytes(info)?;
        let data = quant::dequantize(info.ggml_type, bytes, info.numel()).map_err(|cause| {
            GgufError::Tensor {
                path: self.path.clone(),
                name: name.to_string(),
                cause,
            }
        })?;
        Ok((info.shape(), data))
    }
}

/// A tensor to write: its name, row-major shape (outermost first, as
/// [`TensorInfo::shape`] returns it), element type and encoded bytes.
#[derive(Debug, Clone)]
pub struct TensorData {
    pub name: String,
    pub shape: Vec<usize>,
    pub ggml_type: GgmlType,
    pub bytes: Vec<u8>,
}

impl TensorData {
    /// Encodes `values` (row-major, `shape`) as `ggml_type`. Quantized types
    /// need the innermost dimension to be a multiple of their block size.
    pub fn from_f32(
        name: impl Into<String>,
        shape: Vec<usize>,
        ggml_type: GgmlType,
        values: &[f32],
    ) -> Result<Self, GgufError> {
        let name = name.into();
        assert_eq!(
            shape.iter().product::<usize>(),
            values.len(),
            "tensor {name}: values do not match shape {shape:?}"
        );
        let bytes = quant::quantize(ggml_type, values)
            .map_err(|e| GgufError::Write(format!("tensor {name}: {e}")))?;
        Ok(Self {
            name,
            shape,
            ggml_type,
            bytes,
        })
    }
}

fn write_string(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u64).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

fn write_value(out: &mut Vec<u8>, v: &MetadataValue) -> Result<(), GgufError> {
    match v {
        MetadataValue::U8(x) => out.push(*x),
        MetadataValue::I8(x) => out.push(*x as u8),
        MetadataValue::U16(x) => out.extend_from_slice(&x.to_le_bytes()),
        MetadataValue::I16(x) => out.extend_from_slice(&x.to_le_bytes()),
        MetadataValue::U32(x) => out.extend_from_slice(&x.to_le_bytes()),
        MetadataValue::I32(x) => out.extend_from_slice(&x.to_le_bytes()),
        MetadataValue::F32(x) => out.extend_from_slice(&x.to_le_bytes()),
        MetadataValue::Bool(x) => out.push(*x as u8),
        MetadataValue::String(s) => write_string(out, s),
        MetadataValue::U64(x) => out.extend_from_slice(&x.to_le_bytes()),
        MetadataValue::I64(x) => out.extend_from_slice(&x.to_le_bytes()),
        MetadataValue::F64(x) => out.extend_from_slice(&x.to_le_bytes()),
        MetadataValue::Array(elem, items) => {
            if let Some(bad) = items.iter().find(|i| i.value_type() != *elem) {
                return Err(GgufError::Write(format!(
                    "array of {elem:?} holds a {:?}",
                    bad.value_type()
                )));
            }
            out.extend_from_slice(&(*elem as u32).to_le_bytes());
            out.extend_from_slice(&(items.len() as u64).to_le_bytes());
            for item in items {
                write_value(out, item)?;
            }
        }
    }
    Ok(())
}

/// Writes a GGUF v3 file: `metadata` in the given order, then `tensors`, each
/// aligned to `general.alignment` if the metadata sets it, else 32 bytes.
pub fn write_gguf(
    path: &Path,
    metadata: &[(String, MetadataValue)],
    tensors: &[TensorData],
) -> Result<(), GgufError> {
    let alignment = match metadata.iter().find(|(k, _)| k == ALIGNMENT_KEY) {
        None => DEFAULT_ALIGNMENT,
        Some((_, v)) => v
            .as_u64()
            .filter(|a| *a > 0 && a.is_power_of_two())
            .ok_or_else(|| GgufError::Write(format!("{ALIGNMENT_KEY} is {v:?}")))?,
    };
    let mut head = Vec::new();
    head.extend_from_slice(MAGIC);
    head.extend_from_slice(&WRITE_VERSION.to_le_bytes());
    head.extend_from_slice(&(tensors.len() as u64).to_le_bytes());
    head.extend_from_slice(&(metadata.len() as u64).to_le_bytes());
    for (key, value) in metadata {
        write_string(&mut head, key);
        head.extend_from_slice(&(value.value_type() as u32).to_le_bytes());
        write_value(&mut head, value)?;
    }
    let mut offset = 0u64;
    let mut offsets = Vec::with_capacity(tensors.len());
    for t in tensors {
        let numel = t.shape.iter().product::<usize>();
        // Types this crate cannot decode are written as given (tests use them
        // to check that loading refuses them); known types must be exact.
        let want = match t.ggml_type.byte_size(numel) {
            Ok(n) => n,
            Err(QuantError::Unsupported(_)) => t.bytes.len(),
            Err(e) => return Err(GgufError::Write(format!("tensor {}: {e}", t.name))),
        };
        if want != t.bytes.len() {
            return Err(GgufError::Write(format!(
                "tensor {}: {} bytes given, shape {:?} of {} needs {want}",
                t.name,
                t.bytes.len(),
                t.shape,
                t.ggml_type
            )));
        }
        write_string(&mut head, &t.name);
        head.extend_from_slice(&(t.shape.len() as u32).to_le_bytes());
        for d in t.shape.iter().rev() {
            head.extend_from_slice(&(*d as u64).to_le_bytes());
        }
        head.extend_from_slice(&t.ggml_type.0.to_le_bytes());
        head.extend_from_slice(&offset.to_le_bytes());
        offsets.push(offset);
        offset = align_up(offset + want as u64, alignment);
    }
    let io = |cause| GgufError::Io {
        path: path.to_path_buf(),
        cause,
    };
    let mut w = BufWriter::new(File::create(path).map_err(io)?);
    let data_start = align_up(head.len() as u64, alignment);
    head.resize(data_start as usize, 0);
    w.write_all(&head).map_err(io)?;
    let mut pos = 0u64;
    for (t, off) in tensors.iter().zip(offsets) {
        w.write_all(&vec![0u8; (off - pos) as usize]).map_err(io)?;
        w.write_all(&t.bytes).map_err(io)?;
        pos = off + t.bytes.len() as u64;
    }
    w.write_all(&vec![0u8; (align_up(pos, alignment) - pos) as usize])
        .map_err(io)?;
    w.flush().map_err(io)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all_value_kinds() -> Vec<(String, MetadataValue)> {
        vec![
            ("a.u8".into(), MetadataValue::U8(200)),
            ("a.i8".into(), MetadataValue::I8(-5)),
            ("a.u16".into(), MetadataValue::U16(60000)),
            ("a.i16".into(), MetadataValue::I16(-30000)),
            ("a.u32".into(), MetadataValue::U32(4_000_000_000)),
            ("a.i32".into(), MetadataValue::I32(-2_000_000_000)),
            ("a.f32".into(), MetadataValue::F32(1.5e-5)),
            ("a.bool".into(), MetadataValue::Bool(true)),
            ("a.str".into(), MetadataValue::String("héllo ✓".into())),
            ("a.u64".into(), MetadataValue::U64(u64::MAX)),
            ("a.i64".into(), MetadataValue::I64(i64::MIN)),
            ("a.f64".into(), MetadataValue::F64(-2.25)),
            ("a.strs".into(), MetadataValue::strings(["x", "", "日本"])),
            ("a.ints".into(), MetadataValue::i32s([1, -2, 3])),
            (
                "a.nested".into(),
                MetadataValue::Array(
                    ValueType::Array,
                    vec![MetadataValue::i32s([7]), MetadataValue::i32s([])],
                ),
            ),
        ]
    }

    #[test]
    fn metadata_and_tensors_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.gguf");
        let meta = all_value_kinds();
        let values: Vec<f32> = (0..2 * 64).map(|i| i as f32 * 0.25 - 3.0).collect();
        let tensors = vec![
            TensorData::from_f32("w.f32", vec![2, 64], GgmlType::F32, &values).unwrap(),
            TensorData::from_f32("w.q8", vec![2, 64], GgmlType::Q8_0, &values).unwrap(),
            TensorData::from_f32("v", vec![3], GgmlType::F32, &[1.0, 2.0, 3.0]).unwrap(),
        ];
        write_gguf(&path, &meta, &tensors).unwrap();

        let f = GgufFile::open(&path).unwrap();
        assert_eq!(f.version, 3);
        assert_eq!(f.alignment, 32);
        for (k, v) in &meta {
            assert_eq!(f.get(k), Some(v), "{k}");
        }
        assert_eq!(f.tensors.len(), 3);
        assert_eq!(f.tensor_info("w.q8").unwrap().dims, vec![64, 2]);
        assert!(f.tensors.iter().all(|t| t.offset % 32 == 0));
        assert_eq!(
            f.tensor_f32("w.f32").unwrap(),
            (vec![2, 64], values.clone())
        );
        assert_eq!(f.tensor_f32("v").unwrap().1, vec![1.0, 2.0, 3.0]);
        let (_, q8) = f.tensor_f32("w.q8").unwrap();
        let expect = quant::dequantize(GgmlType::Q8_0, &tensors[1].bytes, 128).unwrap();
        assert_eq!(q8, expect);
    }

    #[test]
    fn custom_alignment_is_honoured() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.gguf");
        let meta = vec![(ALIGNMENT_KEY.to_string(), MetadataValue::U32(64))];
        let tensors = vec![
            TensorData::from_f32("a", vec![3], GgmlType::F32, &[1.0, 2.0, 3.0]).unwrap(),
            TensorData::from_f32("b", vec![2], GgmlType::F32, &[4.0, 5.0]).unwrap(),
        ];
        write_gguf(&path, &meta, &tensors).unwrap();
        let f = GgufFile::open(&path).unwrap();
        assert_eq!(f.alignment, 64);
        assert_eq!(f.tensor_info("b").unwrap().offset, 64);
        assert_eq!(f.tensor_f32("b").unwrap().1, vec![4.0, 5.0]);
    }

    #[test]
    fn bad_magic_truncation_and_version_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bad.gguf");
        std::fs::write(&path, b"PK\x03\x04 not a gguf file").unwrap();
        let err = GgufFile::open(&path).unwrap_err().to_string();
        assert!(err.contains("not a GGUF file"), "{err}");

        let mut v1 = b"GGUF".to_vec();
        v1.extend_from_slice(&1u32.to_le_bytes());
        std::fs::write(&path, &v1).unwrap();
        let err = GgufFile::open(&path).unwrap_err().to_string();
        assert!(err.contains("version 1"), "{err}");

        let good = dir.path().join("good.gguf");
        write_gguf(&good, &all_value_kinds(), &[]).unwrap();
        let bytes = std::fs::read(&good).unwrap();
        std::fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
        let err = GgufFile::open(&path).unwrap_err().to_string();
        assert!(err.contains("truncated"), "{err}");
    }
}
