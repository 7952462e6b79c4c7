//! Checkpoints: safetensors files in PyTorch's layouts, so `safetensors.torch.load_file`
//! gives a state_dict. Tensor names and shapes (all float32; w1, w2, w3 = block widths):
//!
//! | name | shape | layout |
//! |---|---|---|
//! | `whiten.weight` | (24, 3, 2, 2) | OIHW; ± eigen-filters of the patch covariance |
//! | `whiten.bias` | (24) | |
//! | `block{b}.conv{1,2}.weight` | (c_out, c_in, 3, 3) | OIHW |
//! | `block{b}.norm{1,2}.weight` | (c_out) | BN γ, always 1 |
//! | `block{b}.norm{1,2}.bias` | (c_out) | BN β |
//! | `block{b}.norm{1,2}.running_mean` / `running_var` | (c_out) | |
//! | `head.weight` | (10, w3) | logits = head(x) · logit_scale |
//!
//! The metadata holds `format` = `speedrun-airbench94`, `widths` = `"w1,w2,w3"`, `activation`
//! (`gelu` or `silu`, the conv blocks'), `logit_scale` (1/9 for airbench94, 1/256 for the Muon
//! recipes) and `recipe`; files without the last three are airbench94's (GELU, 1/9).

use crate::backend::Act;
use crate::model::{Arch, Layout, Slot};
use anyhow::{bail, Context, Result};
use safetensors::{tensor::TensorView, Dtype, SafeTensors};
use std::collections::HashMap;
use std::io::Write;
use std::path::Path;

const FORMAT: &str = "speedrun-airbench94";

/// Internal OHWI shape → PyTorch OIHW shape (other ranks unchanged).
pub fn torch_shape(shape: &[usize]) -> Vec<usize> {
    match *shape {
        [o, h, w, i] => vec![o, i, h, w],
        _ => shape.to_vec(),
    }
}

/// Permutes a tensor between OHWI (`to_torch`) and OIHW.
pub fn permute(shape: &[usize], data: &[f32], to_torch: bool) -> Vec<f32> {
    let [o, h, w, i] = *shape else { return data.to_vec() };
    let mut out = vec![0.0; data.len()];
    for (a, b, c, d) in (0..o).flat_map(|a| (0..h).flat_map(move |b| (0..w).flat_map(move |c| (0..i).map(move |d| (a, b, c, d))))) {
        let ohwi = ((a * h + b) * w + c) * i + d;
        let oihw = ((a * i + d) * h + b) * w + c;
        if to_torch {
            out[oihw] = data[ohwi];
        } else {
            out[ohwi] = data[oihw];
        }
    }
    out
}

fn le_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// Writes a checkpoint atomically: to `PATH.tmp`, then renamed over `path`.
pub fn save(path: &Path, arch: &Arch, params: &[f32], running: &[f32], extra: &[(&str, String)]) -> Result<()> {
    let bytes = to_bytes(arch, params, running, extra)?;
    write_atomically(&bytes, &path.with_extension("safetensors.tmp"), path)
        .with_context(|| format!("cannot write checkpoint {} (is the disk full or the folder missing?)", path.display()))
}

/// Writes `bytes` to `tmp`, then renames it over `path`, so `path` is either what it was or
/// whole; on failure `tmp` is removed.
pub(crate) fn write_atomically(bytes: &[u8], tmp: &Path, path: &Path) -> std::io::Result<()> {
    let write = || -> std::io::Result<()> {
        let mut f = std::fs::File::create(tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?; // on disk before the rename makes it visible
        std::fs::rename(tmp, path)
    };
    write().inspect_err(|_| {
        let _ = std::fs::remove_file(tmp);
    })
}

/// A checkpoint's bytes (the browser offers them as a download).
pub fn to_bytes(arch: &Arch, params: &[f32], running: &[f32], extra: &[(&str, String)]) -> Result<Vec<u8>> {
    let layout = &Layout::new(arch.widths);
    let mut tensors: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::new();
    let mut add = |slot: &Slot, source: &[f32]| {
        let data = permute(&slot.shape, &source[slot.range.clone()], true);
        tensors.push((slot.name.clone(), torch_shape(&slot.shape), le_bytes(&data)));
    };
    layout.params.iter().for_each(|s| add(s, params));
    layout.running.iter().for_each(|s| add(s, running));
    for l in &layout.layers {
        tensors.push((format!("block{}.norm{}.weight", l.block, l.conv), vec![l.c_out], le_bytes(&vec![1.0; l.c_out])));
    }
    let views: Vec<(String, TensorView)> =
        tensors.iter().map(|(n, s, d)| (n.clone(), TensorView::new(Dtype::F32, s.clone(), d).expect("sizes match"))).collect();
    let mut meta: HashMap<String, String> = extra.iter().map(|(k, v)| (k.to_string(), v.clone())).collect();
    meta.insert("format".into(), FORMAT.into());
    meta.insert("widths".into(), layout.widths.map(|w| w.to_string()).join(","));
    meta.insert("activation".into(), if arch.act == Act::Silu { "silu" } else { "gelu" }.into());
    meta.insert("logit_scale".into(), arch.logit_scale.to_string());
    Ok(safetensors::serialize(views, Some(meta))?)
}

/// A checkpoint read back: its layout and host copies of the arena and running statistics.
#[derive(Debug)]
pub struct Loaded {
    pub arch: Arch,
    pub layout: Layout,
    pub params: Vec<f32>,
    pub running: Vec<f32>,
}

pub fn load(path: &Path) -> Result<Loaded> {
    let bytes = std::fs::read(path).with_context(|| format!("cannot read checkpoint {}", path.display()))?;
    let bad = || format!("{} is not a speedrun checkpoint (safetensors written by `speedrun train --save`)", path.display());
    let (_, meta) = SafeTensors::read_metadata(&bytes).map_err(|_| {
        anyhow::anyhow!("{} is not a safetensors file, so not a speedrun checkpoint (`speedrun train --save` writes those)", path.display())
    })?;
    let meta = meta.metadata().clone().unwrap_or_default();
    if meta.get("format").map(String::as_str) != Some(FORMAT) {
        bail!(bad());
    }
    let widths: Vec<usize> = meta
        .get("widths")
        .context("no widths in the checkpoint metadata")?
        .split(',')
        .map(|w| w.parse())
        .collect::<Result<_, _>>()
        .with_context(bad)?;
    let widths: [usize; 3] = widths.try_into().map_err(|_| anyhow::anyhow!(bad()))?;
    if widths.contains(&0) {
        bail!(bad());
    }
    let act = match meta.get("activation").map(String::as_str) {
        None | Some("gelu") => Act::Gelu,
        Some("silu") => Act::Silu,
        Some(other) => bail!("{}: unknown activation {other:?} (gelu or silu)", path.display()),
    };
    let logit_scale = match meta.get("logit_scale") {
        None => 1.0 / 9.0,
        Some(v) => v.parse::<f32>().ok().filter(|s| s.is_finite() && *s > 0.0).with_context(bad)?,
    };
    let arch = Arch { widths, act, logit_scale };
    // In f64 before the layout is built: absurd widths would overflow its sizes.
    if (crate::memory::param_count(widths) + crate::memory::running_count(widths)) * 4.0 > bytes.len() as f64 {
        bail!("{}: widths {widths:?} need more data than the file holds; {}", path.display(), bad());
    }
    let layout = Layout::new(widths);
    let st = SafeTensors::deserialize(&bytes).with_context(bad)?;
    let read = |slots: &[Slot], len: usize| -> Result<Vec<f32>> {
        let mut out = vec![0.0f32; len];
        for slot in slots {
            let t = st.tensor(&slot.name).with_context(|| format!("{}: tensor {} is missing", path.display(), slot.name))?;
            if t.dtype() != Dtype::F32 || t.shape() != torch_shape(&slot.shape).as_slice() {
                bail!(
                    "{}: tensor {} is {:?} {:?}, expected F32 {:?}",
                    path.display(),
                    slot.name,
                    t.dtype(),
                    t.shape(),
                    torch_shape(&slot.shape)
                );
            }
            let data: Vec<f32> = t.data().chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect();
            out[slot.range.clone()].copy_from_slice(&permute(&slot.shape, &data, false));
        }
        Ok(out)
    };
    let params = read(&layout.params, layout.params_len())?;
    let running = read(&layout.running, layout.running_len)?;
    // BatchNorm γ: fixed at 1 in this network; a file with another γ is another network.
    let gammas: Vec<Slot> = layout
        .layers
        .iter()
        .map(|l| Slot { name: format!("block{}.norm{}.weight", l.block, l.conv), shape: vec![l.c_out], range: 0..l.c_out })
        .collect();
    for (slot, gamma) in gammas.iter().map(|s| (s, read(std::slice::from_ref(s), s.range.end))) {
        if let Some((i, v)) = gamma?.iter().enumerate().find(|(_, &v)| v != 1.0) {
            bail!(
                "{}: {}[{i}] (BatchNorm γ) is {v}, but this format fixes every γ at 1 (the recipes do not train it), so the network cannot be loaded as saved; set γ back to 1",
                path.display(),
                slot.name
            );
        }
    }
    check_values(&layout, &params, &running)
        .map_err(|e| anyhow::anyhow!("{}: {e}; the checkpoint is damaged (or its run diverged)", path.display()))?;
    Ok(Loaded { arch, layout, params, running })
}

/// Every weight finite and every BatchNorm variance finite and non-negative: anything else
/// would evaluate to NaN logits (10% accuracy) without an error.
pub fn check_values(layout: &Layout, params: &[f32], running: &[f32]) -> std::result::Result<(), String> {
    for (slot, values) in layout.params.iter().map(|s| (s, params)).chain(layout.running.iter().map(|s| (s, running))) {
        let is_var = slot.name.ends_with("running_var");
        let bad = values[slot.range.clone()].iter().enumerate().find(|(_, v)| !v.is_finite() || (is_var && **v < 0.0));
        if let Some((i, v)) = bad {
            return Err(format!(
                "tensor {} holds {v} at index {i}{}",
                slot.name,
                if is_var { " (a variance must be finite and ≥ 0)" } else { "" }
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Rng;

    #[test]
    fn round_trips_and_uses_torch_layouts() {
        let layout = Layout::new([8, 16, 16]);
        let (params, running) = layout.init(&mut Rng::new(3), false, false);
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("net.safetensors");
        let arch = Arch { widths: [8, 16, 16], act: Act::Silu, logit_scale: 1.0 / 256.0 };
        save(&path, &arch, &params, &running, &[("tta_accuracy", "0.5".into())]).unwrap();
        let loaded = load(&path).unwrap();
        assert_eq!(loaded.params, params);
        assert_eq!(loaded.running, running);
        assert_eq!(loaded.arch, arch);
        // block1.conv2 starts as the identity: OIHW [o][o][1][1] = 1.
        let bytes = std::fs::read(&path).unwrap();
        let st = SafeTensors::deserialize(&bytes).unwrap();
        let w = st.tensor("block1.conv2.weight").unwrap();
        assert_eq!(w.shape(), &[8, 8, 3, 3]);
        let at = |o: usize, i: usize, y: usize, x: usize| {
            let k = 4 * (((o * 8 + i) * 3 + y) * 3 + x);
            f32::from_le_bytes(w.data()[k..k + 4].try_into().unwrap())
        };
        assert_eq!((at(5, 5, 1, 1), at(5, 4, 1, 1), at(5, 5, 0, 1)), (1.0, 0.0, 0.0));
        assert_eq!(st.tensor("block3.norm2.weight").unwrap().shape(), &[16]);
        assert!(std::fs::read_dir(tmp.path()).unwrap().count() == 1, "no temp file left behind");
        for widths in ["0,0,0", "100000,100000,100000"] {
            let meta = HashMap::from([("format".to_string(), FORMAT.to_string()), ("widths".to_string(), widths.to_string())]);
            std::fs::write(&path, safetensors::serialize(Vec::<(String, TensorView)>::new(), Some(meta)).unwrap()).unwrap();
            assert!(load(&path).unwrap_err().to_string().contains("not a speedrun checkpoint"), "widths {widths}");
        }
        std::fs::write(&path, b"not a checkpoint").unwrap();
        assert!(load(&path).unwrap_err().to_string().contains("not a speedrun checkpoint"));
    }
}
