//! Models as safetensors files, read and written a chunk at a time.
//!
//! Every model a federated job moves is a safetensors file of f32 tensors. Tensors lie
//! back to back in the data section in offset order, so a model is also one flat f32
//! vector: two models of the same [`Layout`] line up element for element, and
//! aggregation reads the same element range from each of them without ever holding a
//! whole model.

use safetensors::tensor::{Dtype, Metadata, TensorInfo};
use std::collections::HashMap;
use std::fs::File;
use std::io::{BufReader, BufWriter, Read, Seek, SeekFrom, Write};
use std::path::Path;

/// The largest header read: 16 MiB of JSON describes far more tensors than any model
/// edgeloom aggregates, and bounds what a hostile file costs to parse.
const MAX_HEADER: u64 = 16 << 20;

/// Why a model file is unusable.
#[derive(Debug, thiserror::Error, Clone, PartialEq)]
pub enum ModelError {
    /// I/O.
    #[error("{0}")]
    Io(String),
    /// Not a safetensors file, or one whose header and size disagree.
    #[error("not a valid safetensors model: {0}")]
    Format(String),
    /// A tensor of a type edgeloom does not aggregate.
    #[error("tensor {0} is {1}; federated models are f32")]
    Dtype(String, String),
}

impl From<std::io::Error> for ModelError {
    fn from(e: std::io::Error) -> Self {
        ModelError::Io(e.to_string())
    }
}

/// One tensor: its name and shape.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tensor {
    /// Name, as the training framework wrote it (e.g. `fc1.weight`).
    pub name: String,
    /// Shape.
    pub shape: Vec<usize>,
}

impl Tensor {
    /// Number of elements.
    pub fn elements(&self) -> usize {
        self.shape.iter().product()
    }
}

/// The tensors of a model in data order: what two models must share to be averaged.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout(pub Vec<Tensor>);

impl Layout {
    /// Elements of all tensors.
    pub fn elements(&self) -> usize {
        self.0.iter().map(Tensor::elements).sum()
    }
}

/// A model file opened for reading: its layout and where its data starts.
#[derive(Debug)]
pub struct ModelReader {
    /// The tensors.
    pub layout: Layout,
    /// The header's free-form metadata.
    pub metadata: HashMap<String, String>,
    data_start: u64,
    file: BufReader<File>,
    position: Option<u64>,
}

impl ModelReader {
    /// Opens `path` and checks its header against its size.
    pub fn open(path: &Path) -> Result<ModelReader, ModelError> {
        let file =
            File::open(path).map_err(|e| ModelError::Io(format!("{}: {e}", path.display())))?;
        let size = file.metadata()?.len();
        let mut file = BufReader::with_capacity(1 << 16, file);
        let mut n = [0u8; 8];
        file.read_exact(&mut n)
            .map_err(|_| ModelError::Format("shorter than its 8-byte header length".into()))?;
        let n = u64::from_le_bytes(n);
        if n > MAX_HEADER || n + 8 > size {
            return Err(ModelError::Format(format!(
                "header length {n} does not fit a {size}-byte file"
            )));
        }
        let mut header = vec![0u8; n as usize];
        file.read_exact(&mut header)?;
        let metadata: Metadata = serde_json::from_slice(&header)
            .map_err(|e| ModelError::Format(format!("header: {e}")))?;
        if 8 + n + metadata.data_len() as u64 != size {
            return Err(ModelError::Format(format!(
                "the header describes {} data bytes; the file holds {}",
                metadata.data_len(),
                size - 8 - n
            )));
        }
        let infos = metadata.tensors();
        let mut tensors = Vec::with_capacity(infos.len());
        for name in metadata.offset_keys() {
            let info = infos[&name];
            if info.dtype != Dtype::F32 {
                return Err(ModelError::Dtype(name, format!("{:?}", info.dtype)));
            }
            tensors.push(Tensor {
                name,
                shape: info.shape.clone(),
            });
        }
        Ok(ModelReader {
            layout: Layout(tensors),
            metadata: metadata.metadata().clone().unwrap_or_default(),
            data_start: 8 + n,
            file,
            position: None,
        })
    }

    /// Reads elements `start..start + out.len()` of the flat vector into `out`.
    pub fn read(&mut self, start: usize, out: &mut [f32]) -> Result<(), ModelError> {
        let at = self.data_start + 4 * start as u64;
        if self.position != Some(at) {
            self.file.seek(SeekFrom::Start(at))?;
        }
        let mut bytes = [0u8; 4096];
        let mut done = 0;
        while done < out.len() {
            let take = (out.len() - done).min(bytes.len() / 4);
            self.file.read_exact(&mut bytes[..take * 4])?;
            for (o, b) in out[done..done + take].iter_mut().zip(bytes.chunks_exact(4)) {
                *o = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
            }
            done += take;
        }
        self.position = Some(at + 4 * out.len() as u64);
        Ok(())
    }
}

/// Writes a model of a given layout, a chunk at a time, in data order.
pub struct ModelWriter {
    file: BufWriter<File>,
    remaining: usize,
}

impl ModelWriter {
    /// Creates `path` with the header of `layout` and `metadata`.
    pub fn create(
        path: &Path,
        layout: &Layout,
        metadata: HashMap<String, String>,
    ) -> Result<ModelWriter, ModelError> {
        let mut offset = 0;
        let tensors = layout
            .0
            .iter()
            .map(|t| {
                let bytes = 4 * t.elements();
                let info = TensorInfo {
                    dtype: Dtype::F32,
                    shape: t.shape.clone(),
                    data_offsets: (offset, offset + bytes),
                };
                offset += bytes;
                (t.name.clone(), info)
            })
            .collect();
        let metadata = Metadata::new((!metadata.is_empty()).then_some(metadata), tensors)
            .map_err(|e| ModelError::Format(e.to_string()))?;
        let mut header =
            serde_json::to_vec(&metadata).map_err(|e| ModelError::Format(e.to_string()))?;
        // The data section starts 8-byte aligned, padded with spaces as safetensors does.
        while header.len() % 8 != 0 {
            header.push(b' ');
        }
        let file =
            File::create(path).map_err(|e| ModelError::Io(format!("{}: {e}", path.display())))?;
        let mut file = BufWriter::with_capacity(1 << 16, file);
        file.write_all(&(header.len() as u64).to_le_bytes())?;
        file.write_all(&header)?;
        Ok(ModelWriter {
            file,
            remaining: layout.elements(),
        })
    }

    /// Appends the next elements.
    pub fn write(&mut self, values: &[f32]) -> Result<(), ModelError> {
        if values.len() > self.remaining {
            return Err(ModelError::Format(
                "more values than the layout holds".into(),
            ));
        }
        for v in values {
            self.file.write_all(&v.to_le_bytes())?;
        }
        self.remaining -= values.len();
        Ok(())
    }

    /// Flushes; every element must have been written.
    pub fn finish(mut self) -> Result<(), ModelError> {
        if self.remaining != 0 {
            return Err(ModelError::Format(format!(
                "{} values of the layout were never written",
                self.remaining
            )));
        }
        self.file.flush()?;
        self.file.get_ref().sync_all()?;
        Ok(())
    }
}

/// Writes a whole model held in memory (tests, benchmarks, small models).
pub fn write_model(
    path: &Path,
    tensors: &[(Tensor, Vec<f32>)],
    metadata: HashMap<String, String>,
) -> Result<(), ModelError> {
    let layout = Layout(tensors.iter().map(|(t, _)| t.clone()).collect());
    let mut w = ModelWriter::create(path, &layout, metadata)?;
    for (t, v) in tensors {
        if v.len() != t.elements() {
            return Err(ModelError::Format(format!(
                "tensor {} has {} values for shape {:?}",
                t.name,
                v.len(),
                t.shape
            )));
        }
        w.write(v)?;
    }
    w.finish()
}

/// Writes a model of `layout` from one flat vector in data order: the inverse of
/// [`read_flat`] (tests, benchmarks, small models).
pub fn write_flat(
    path: &Path,
    layout: &Layout,
    values: &[f32],
    metadata: HashMap<String, String>,
) -> Result<(), ModelError> {
    if values.len() != layout.elements() {
        return Err(ModelError::Format(format!(
            "{} values for a layout of {}",
            values.len(),
            layout.elements()
        )));
    }
    let mut w = ModelWriter::create(path, layout, metadata)?;
    w.write(values)?;
    w.finish()
}

/// Reads a whole model into memory as one flat vector (tests, benchmarks, small models).
pub fn read_flat(path: &Path) -> Result<(Layout, Vec<f32>), ModelError> {
    let mut r = ModelReader::open(path)?;
    let mut v = vec![0.0; r.layout.elements()];
    r.read(0, &mut v)?;
    Ok((r.layout.clone(), v))
}

/// sha256 (hex) of a file's bytes: the digest a node reports for the update it wrote.
pub fn file_sha256(path: &Path) -> Result<String, ModelError> {
    use sha2::{Digest, Sha256};
    let mut f = File::open(path).map_err(|e| ModelError::Io(format!("{}: {e}", path.display())))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(hex::encode(h.finalize()))
}
