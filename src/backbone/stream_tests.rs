use candle_core::{DType, Device, Tensor};

use super::*;

/// A B × L × d tensor whose element (b, i, j) is 100·b + 10·i + j, so rows and slots are traceable.
fn grid(b: usize, l: usize, d: usize) -> Tensor {
    let v: Vec<f32> = (0..b * l * d)
        .map(|n| (100 * (n / (l * d)) + 10 * (n / d % l) + n % d) as f32)
        .collect();
    Tensor::from_vec(v, (b, l, d), &Device::Cpu).unwrap()
}

fn rows(t: &Tensor) -> Vec<Vec<Vec<f32>>> {
    t.to_vec3::<f32>().unwrap()
}

/// n × d rows holding `v` everywhere.
fn filled(n: usize, d: usize, v: f32) -> Tensor {
    Tensor::full(v, (n, d), &Device::Cpu).unwrap()
}

#[test]
fn new_rejects_a_mask_or_positions_of_the_wrong_shape() {
    let x = grid(2, 3, 1);
    assert!(Stream::new(x.clone(), vec![vec![1; 3]; 2], vec![vec![0; 3]; 2]).is_ok());
    for (m, p) in [
        (vec![vec![1; 3]; 1], vec![vec![0; 3]; 2]),
        (vec![vec![1; 2]; 2], vec![vec![0; 3]; 2]),
        (vec![vec![1; 3]; 2], vec![vec![0; 3], vec![0; 4]]),
    ] {
        let e = Stream::new(x.clone(), m, p).unwrap_err();
        assert!(matches!(e, StreamError::Shape(_)), "{e}");
    }
}

#[test]
fn positions_follow_the_mask_from_each_rows_start() {
    let s = Stream::from_mask(
        grid(2, 4, 1),
        vec![vec![0, 0, 1, 1], vec![1, 0, 1, 1]],
        &[0, 7],
    )
    .unwrap();
    assert_eq!(s.positions(), &[vec![0, 0, 0, 1], vec![7, 0, 8, 9]]);
    assert_eq!((s.real_len(0), s.real_len(1)), (2, 3));
    let t = s.positions_tensor().unwrap().to_vec2::<u32>().unwrap();
    assert_eq!(t, vec![vec![0, 0, 0, 1], vec![7, 0, 8, 9]]);
    // Without a cache, counting starts at 0.
    let c = Stream::continuing(grid(1, 2, 1), vec![vec![1, 1]], None).unwrap();
    assert_eq!(c.positions(), &[vec![0, 1]]);
}

#[test]
fn rows_are_padded_with_zeros_on_the_chosen_side() {
    let pieces = vec![
        vec![filled(1, 2, 1.0), filled(2, 2, 2.0)],
        vec![filled(1, 2, 3.0)],
        vec![],
    ];
    let dev = Device::Cpu;
    let left = Stream::from_rows(&pieces, Side::Left, &[5, 0, 9], (2, DType::F32), &dev).unwrap();
    assert_eq!((left.batch(), left.len()), (3, 3));
    assert_eq!(left.mask(), &[vec![1, 1, 1], vec![0, 0, 1], vec![0, 0, 0]]);
    assert_eq!(
        left.positions(),
        &[vec![5, 6, 7], vec![0, 0, 0], vec![0; 3]]
    );
    let v = rows(left.embeds());
    assert_eq!(v[0], vec![vec![1.0; 2], vec![2.0; 2], vec![2.0; 2]]);
    assert_eq!(v[1], vec![vec![0.0; 2], vec![0.0; 2], vec![3.0; 2]]);
    assert_eq!(v[2], vec![vec![0.0; 2]; 3]);

    let right = Stream::from_rows(&pieces, Side::Right, &[5, 4, 9], (2, DType::F32), &dev).unwrap();
    assert_eq!(right.mask(), &[vec![1, 1, 1], vec![1, 0, 0], vec![0, 0, 0]]);
    assert_eq!(
        right.positions(),
        &[vec![5, 6, 7], vec![4, 0, 0], vec![0; 3]]
    );
    assert_eq!(rows(right.embeds())[1][0], vec![3.0; 2]);

    // Nothing in any row: an empty stream, still B rows.
    let empty = Stream::from_rows(
        &[vec![], vec![]],
        Side::Left,
        &[0, 0],
        (2, DType::F32),
        &dev,
    )
    .unwrap();
    assert!(empty.is_empty());
    assert_eq!(empty.batch(), 2);
}

#[test]
fn pad_and_cat_join_rows_in_time() {
    let a = Stream::from_mask(grid(2, 2, 1), vec![vec![0, 1], vec![1, 1]], &[0, 0]).unwrap();
    let b = Stream::new(
        grid(2, 1, 1),
        vec![vec![1], vec![0]],
        vec![vec![1], vec![9]],
    )
    .unwrap();
    let c = Stream::cat(&[a.clone(), b]).unwrap();
    assert_eq!(c.mask(), &[vec![0, 1, 1], vec![1, 1, 0]]);
    assert_eq!(c.positions(), &[vec![0, 0, 1], vec![0, 1, 9]]);
    assert_eq!(
        rows(c.embeds()),
        vec![
            vec![vec![0.0], vec![10.0], vec![0.0]],
            vec![vec![100.0], vec![110.0], vec![100.0]]
        ]
    );
    let l = a.pad(4, Side::Left).unwrap();
    assert_eq!(l.mask(), &[vec![0, 0, 0, 1], vec![0, 0, 1, 1]]);
    assert_eq!(
        rows(l.embeds())[1],
        vec![vec![0.0], vec![0.0], vec![100.0], vec![110.0]]
    );
    let r = a.pad(3, Side::Right).unwrap();
    assert_eq!(r.positions(), &[vec![0, 0, 0], vec![0, 1, 0]]);
    assert!(a.pad(1, Side::Left).is_err());
    let other = Stream::from_mask(grid(3, 1, 1), vec![vec![1]; 3], &[0; 3]).unwrap();
    assert!(Stream::cat(&[a, other]).is_err());
    assert!(Stream::cat(&[]).is_err());
}

#[test]
fn latents_go_after_the_stream_only_in_the_rows_that_take_them() {
    let s = Stream::from_mask(grid(2, 1, 2), vec![vec![1], vec![1]], &[3, 5]).unwrap();
    let lat = Tensor::full(7f32, (2, 2, 2), &Device::Cpu).unwrap();
    let out = s.append_latents(&lat, &[true, false], &[4, 6]).unwrap();
    assert_eq!(out.mask(), &[vec![1, 1, 1], vec![1, 0, 0]]);
    assert_eq!(out.positions(), &[vec![3, 4, 5], vec![5, 0, 0]]);
    assert_eq!(rows(out.embeds())[0][1], vec![7.0, 7.0]);
    assert!(s.append_latents(&lat, &[true], &[4, 6]).is_err());
}

#[test]
fn rows_can_be_selected_and_masked_out() {
    let s = Stream::from_mask(
        grid(3, 2, 1),
        vec![vec![1, 1], vec![0, 1], vec![1, 1]],
        &[0; 3],
    )
    .unwrap();
    let sel = s.select_rows(&[2, 1]).unwrap();
    assert_eq!(sel.mask(), &[vec![1, 1], vec![0, 1]]);
    assert_eq!(sel.positions(), &[vec![0, 1], vec![0, 0]]);
    assert_eq!(rows(sel.embeds())[0], vec![vec![200.0], vec![210.0]]);
    assert!(s.select_rows(&[3]).is_err());
    let m = s.mask_rows(&[true, false, true]).unwrap();
    assert_eq!(m.mask(), &[vec![1, 1], vec![0, 0], vec![1, 1]]);
    assert_eq!(m.positions(), s.positions());
    let w = s.map_embeds(|x| x * 2.0).unwrap();
    assert_eq!(rows(w.embeds())[2][1], vec![420.0]);
    assert_eq!(w.mask(), s.mask());
}
