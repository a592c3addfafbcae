use candle_core::Device;
use memgen::backbone::generate::{ids_tensor, left_pad};
use memgen::backbone::model::{positions_from_mask, positions_tensor};
use memgen::backbone::{self, Mode};
use std::time::Instant;
fn main() -> anyhow::Result<()> {
    let path = backbone::resolve_model(Some("default"))?;
    let m = backbone::load(&path, candle_core::DType::F32, &Device::Cpu)?;
    let text =
        "The old lighthouse keeper climbed the stairs every evening to light the lamp. ".repeat(64);
    let mut ids = m.tokenizer.encode(&text)?;
    ids.truncate(128);
    let (pid, mask) = left_pad(&[ids], 0);
    let dev = Device::Cpu;
    let pos = positions_tensor(&positions_from_mask(&mask, &[0]), &dev)?;
    for _ in 0..5 {
        let t = Instant::now();
        let x = m.backbone.embed(&ids_tensor(&pid, &dev)?)?;
        let _h = m
            .backbone
            .forward(&x, &mask, &pos, None, &mut Mode::Infer)?;
        println!("prefill {:.3}s", t.elapsed().as_secs_f64());
    }
    Ok(())
}
