//! Fused activations: GELU backward (tanh and exact erf) and SwiGLU forward and backward.

use super::*;

// ---------------------------------------------------------------------------------------------
// Activations

macro_rules! binary_api {
    ($(#[$doc:meta])* $name:ident($a:ident, $b:ident), $chain:path, $cpu:ident) => {
        $(#[$doc])*
        pub fn $name($a: &Tensor, $b: &Tensor) -> Result<Tensor> {
            same_shape(stringify!($name), $a, $b)?;
            if !fusable($a) {
                return $chain($a, $b);
            }
            on_cuda!($a, fused_cuda::$name($a, $b));
            cpu_dtype!($a.dtype(), stringify!($name), $cpu($a, $b))
        }
    };
}

binary_api!(
    /// `dy · gelu'(x)` for `gelu(x, approximate="tanh")` (chain: [`ops::gelu_tanh_backward`]).
    gelu_tanh_backward(x, dy), ops::gelu_tanh_backward, gelu_tanh_backward_cpu
);
binary_api!(
    /// `dy · (Φ(x) + x·φ(x))` for the exact gelu (chain: [`ops::gelu_erf_backward`]).
    gelu_erf_backward(x, dy), ops::gelu_erf_backward, gelu_erf_backward_cpu
);
binary_api!(
    /// `silu(gate) · up` with silu rounded to the dtype first, as HF (chain: [`ops::swiglu`]).
    swiglu(gate, up), ops::swiglu, swiglu_cpu
);

fn map2<T: Elem>(a: &Tensor, b: &Tensor, f: impl Fn(T::R, T::R) -> T::R + Sync) -> Result<Tensor> {
    let av: Vec<T> = host(a)?;
    let bv: Vec<T> = host(b)?;
    let g = |(x, y): (&T, &T)| T::put(f(x.get(), y.get()));
    let out: Vec<T> = if av.len() < PAR_MIN {
        av.iter().zip(&bv).map(g).collect()
    } else {
        av.par_iter().zip(bv.par_iter()).map(g).collect()
    };
    cpu(out, a.dims())
}

/// The chain's f64 constants as the accumulation type rounds them (candle's affine does too).
fn k<T: Elem>(v: f64) -> T::R {
    T::R::c(v)
}

const SQRT_2_OVER_PI: f64 = 0.797_884_560_802_865_4;
const GELU_C: f64 = 0.044715;

fn gelu_tanh_backward_cpu<T: Elem>(x: &Tensor, dy: &Tensor) -> Result<Tensor> {
    let (k0, k1) = (k::<T>(SQRT_2_OVER_PI), k::<T>(SQRT_2_OVER_PI * GELU_C));
    let (k2, k3) = (k::<T>(0.5 * SQRT_2_OVER_PI * 3.0 * GELU_C), k::<T>(0.5 * SQRT_2_OVER_PI));
    let (half, one) = (k::<T>(0.5), k::<T>(1.0));
    map2::<T>(x, dy, |v, d| {
        let v2 = v * v;
        let t = ((v2 * k1 + k0) * v).tanh();
        let left = t * half + half;
        let du = v2 * k2 + k3;
        let right = (t * t * -one + one) * v * du;
        (left + right) * d
    })
}

fn gelu_erf_backward_cpu<T: Elem>(x: &Tensor, dy: &Tensor) -> Result<Tensor> {
    let r2 = k::<T>(std::f64::consts::FRAC_1_SQRT_2);
    let inv = k::<T>(1.0 / (2.0 * std::f64::consts::PI).sqrt());
    let half = k::<T>(0.5);
    map2::<T>(x, dy, |v, d| {
        let cdf = (v * r2).erf() * half + half;
        let pdf = (v * v * -half).exp() * inv;
        (cdf + v * pdf) * d
    })
}

/// `T(T(silu(g))·u)`: HF `act_fn(gate) * up` (silu computed in f32 and rounded, as torch does).
fn swiglu_cpu<T: Elem>(g: &Tensor, u: &Tensor) -> Result<Tensor> {
    let one = k::<T>(1.0);
    map2::<T>(g, u, |gv, uv| rnd::<T>(gv / (one + (-gv).exp())) * uv)
}

/// Backward of [`swiglu`]: `(dg, du)`.
pub fn swiglu_backward(gate: &Tensor, up: &Tensor, dm: &Tensor) -> Result<(Tensor, Tensor)> {
    same_shape("swiglu_backward", gate, up)?;
    same_shape("swiglu_backward", gate, dm)?;
    if !fusable(gate) {
        return ops::swiglu_backward(gate, up, dm);
    }
    on_cuda!(gate, fused_cuda::swiglu_backward(gate, up, dm));
    cpu_dtype!(gate.dtype(), "swiglu_backward", swiglu_backward_cpu(gate, up, dm))
}

fn swiglu_backward_cpu<T: Elem>(gate: &Tensor, up: &Tensor, dm: &Tensor) -> Result<(Tensor, Tensor)> {
    let gv: Vec<T> = host(gate)?;
    let uv: Vec<T> = host(up)?;
    let dv: Vec<T> = host(dm)?;
    let one = k::<T>(1.0);
    let g = |((g, u), d): ((&T, &T), &T)| {
        let (g, u, d) = (g.get(), u.get(), d.get());
        let s = one / ((-g).exp() + one);
        let silu = g * s;
        let dsilu = s * (g * (s * -one + one) + one);
        (T::put(d * u * dsilu), T::put(d * silu))
    };
    let (dg, du): (Vec<T>, Vec<T>) = if gv.len() < PAR_MIN {
        gv.iter().zip(&uv).zip(&dv).map(g).unzip()
    } else {
        gv.par_iter().zip(uv.par_iter()).zip(dv.par_iter()).map(g).unzip()
    };
    Ok((cpu(dg, gate.dims())?, cpu(du, gate.dims())?))
}
