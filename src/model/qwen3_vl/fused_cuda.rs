//! CUDA launches of the fused kernels (`kernels/{attention,norm,act}.cu`, feature `cuda`). The
//! CPU paths of `fused/` compute the same arithmetic and are the reference; shapes and dtypes are
//! checked there before these run. Outputs are fresh allocations, every element written by the
//! kernel (the self-test poisons them first to prove it).

use std::sync::atomic::{AtomicBool, Ordering};

use candle_core::backend::BackendDevice;
use candle_core::cuda_backend::cudarc::driver::{
    CudaFunction, CudaSlice, CudaView, DeviceRepr, LaunchArgs, LaunchConfig, PushKernelArg,
};
use candle_core::cuda_backend::{CudaDType, WrapErr};
use candle_core::op::BackpropOp;
use candle_core::{bail, CudaDevice, CudaStorage, DType, Device, Layout, Result, Shape, Storage, Tensor, WithDType};
use half::{bf16, f16};

const ATTN_IMAGE: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/attention.fatbin"));
const NORM_IMAGE: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/norm.fatbin"));
const ACT_IMAGE: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/act.fatbin"));

#[derive(Clone, Copy)]
enum Module {
    Attn,
    Norm,
    Act,
}

impl Module {
    fn name_image(self) -> (&'static str, &'static [u8]) {
        match self {
            Module::Attn => ("qsens_attention", ATTN_IMAGE),
            Module::Norm => ("qsens_norm", NORM_IMAGE),
            Module::Act => ("qsens_act", ACT_IMAGE),
        }
    }
}

/// Rows per 256-thread block of the warp-per-row kernels (`WARPS_PER_BLOCK`, `NORM_THREADS/32`).
const WARPS_PER_BLOCK: usize = 8;
const THREADS: u32 = 256;
/// Norm rows up to this long run a warp per row, longer ones a block per row.
const WARP_ROW_MAX: usize = 512;

static POISON: AtomicBool = AtomicBool::new(false);
static SYNC_CHECK: AtomicBool = AtomicBool::new(false);
static FROM_ENV: std::sync::Once = std::sync::Once::new();

/// `QSENS_FUSED_DEBUG=1` turns both debug switches on for a whole run (e.g. a model forward and
/// backward under `profile_scoring`): slow, but every fused kernel is checked where it runs.
fn debug_from_env() {
    FROM_ENV.call_once(|| {
        if std::env::var("QSENS_FUSED_DEBUG").is_ok_and(|v| v != "0") {
            POISON.store(true, Ordering::Relaxed);
            SYNC_CHECK.store(true, Ordering::Relaxed);
        }
    });
}

pub fn set_debug(poison: bool, sync_check: bool) {
    debug_from_env();
    POISON.store(poison, Ordering::Relaxed);
    SYNC_CHECK.store(sync_check, Ordering::Relaxed);
}

fn device(t: &Tensor) -> Result<CudaDevice> {
    match t.device() {
        Device::Cuda(d) => Ok(d.clone()),
        _ => bail!("expected a CUDA tensor"),
    }
}

fn kernel(dev: &CudaDevice, m: Module, name: &str, dt: DType) -> Result<CudaFunction> {
    let suffix = match dt {
        DType::F32 => "f32",
        DType::BF16 => "bf16",
        DType::F16 => "f16",
        DType::U8 => "u8",
        dt => bail!("{name}: no CUDA kernel for {dt:?}"),
    };
    let (module, image) = m.name_image();
    Ok(dev.get_or_load_custom_image(&format!("{name}_{suffix}"), module, image)?.into_cuda_function())
}

/// After a launch: with `sync_check`, waits for the kernel and names it in the error.
fn done(dev: &CudaDevice, name: &str) -> Result<()> {
    debug_from_env();
    if SYNC_CHECK.load(Ordering::Relaxed) {
        if let Err(e) = dev.synchronize() {
            bail!("CUDA kernel {name} failed: {e}")
        }
    }
    Ok(())
}

/// Launches `$name` (dtype suffix added) with the given argument references; scalar arguments
/// must be bound to locals of exactly the kernel's parameter types (i32, i64, f32, usize, u8).
macro_rules! launch {
    ($dev:expr, $module:expr, $name:expr, $dt:expr, $cfg:expr, [$($arg:expr),* $(,)?]) => {{
        let f = kernel($dev, $module, $name, $dt)?;
        let stream = $dev.cuda_stream();
        let mut b = stream.launch_builder(&f);
        $( b.arg($arg); )*
        // SAFETY: the arguments match the kernel's parameter list (kernels/*.cu) in order and type;
        // pointers cover the ranges the kernel reads/writes (checked by the callers in fused/).
        unsafe { b.launch($cfg) }.w()?;
        drop(b);
        done($dev, $name)?;
    }};
}

/// A contiguous input's elements.
fn view<'a, T: CudaDType + DeviceRepr>(s: &'a Storage, l: &Layout, what: &str) -> Result<CudaView<'a, T>> {
    let Storage::Cuda(cs) = s else { bail!("{what}: not a CUDA tensor") };
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(cs.as_cuda_slice::<T>()?.slice(a..b)),
        None => bail!("{what}: not contiguous"),
    }
}

/// A strided input's storage from its first element on (the kernel applies the strides).
fn view_from<'a, T: CudaDType + DeviceRepr>(s: &'a Storage, l: &Layout, what: &str) -> Result<CudaView<'a, T>> {
    let Storage::Cuda(cs) = s else { bail!("{what}: not a CUDA tensor") };
    Ok(cs.as_cuda_slice::<T>()?.slice(l.start_offset()..))
}

/// Pushes `v`, or a null device pointer where the kernel takes an optional buffer.
fn arg_or_null<'a, A>(b: &mut LaunchArgs<'a>, v: Option<A>, null: &'a u64)
where
    LaunchArgs<'a>: PushKernelArg<A> + PushKernelArg<&'a u64>,
{
    match v {
        Some(v) => PushKernelArg::<A>::arg(b, v),
        None => PushKernelArg::<&'a u64>::arg(b, null),
    };
}

/// An output buffer of `n` elements (poisoned with NaN bytes in debug mode).
fn alloc<T: DeviceRepr>(dev: &CudaDevice, n: usize) -> Result<CudaSlice<T>> {
    // SAFETY: the launching kernel writes every element before anything reads it.
    let mut s = unsafe { dev.alloc::<T>(n.max(1))? };
    debug_from_env();
    if POISON.load(Ordering::Relaxed) {
        let bytes = n.max(1) * std::mem::size_of::<T>();
        let v = 0xffu8;
        let cfg = grid(bytes);
        launch!(dev, Module::Attn, "qsens_fill", DType::U8, cfg, [&mut s, &bytes, &v]);
    }
    Ok(s)
}

fn wrap<T: CudaDType>(s: CudaSlice<T>, dev: &CudaDevice, shape: impl Into<Shape>) -> Tensor {
    Tensor::from_storage(Storage::Cuda(CudaStorage::wrap_cuda_slice(s, dev.clone())), shape, BackpropOp::none(), false)
}

/// Grid-stride elementwise launch over `n` items.
fn grid(n: usize) -> LaunchConfig {
    let blocks = n.div_ceil(THREADS as usize).clamp(1, 1 << 16) as u32;
    LaunchConfig { grid_dim: (blocks, 1, 1), block_dim: (THREADS, 1, 1), shared_mem_bytes: 0 }
}

/// One warp per row.
fn warp_rows(rows: usize) -> LaunchConfig {
    let blocks = rows.div_ceil(WARPS_PER_BLOCK).max(1) as u32;
    LaunchConfig { grid_dim: (blocks, 1, 1), block_dim: (THREADS, 1, 1), shared_mem_bytes: 0 }
}

/// Norm kernels: (name suffix, config) for `rows` rows of `dd`.
fn norm_rows(rows: usize, dd: usize) -> (&'static str, LaunchConfig) {
    if dd <= WARP_ROW_MAX {
        ("warp", warp_rows(rows))
    } else {
        (
            "block",
            LaunchConfig { grid_dim: (rows.max(1) as u32, 1, 1), block_dim: (THREADS, 1, 1), shared_mem_bytes: 0 },
        )
    }
}

fn i32_of(v: usize, what: &str) -> Result<i32> {
    i32::try_from(v).map_err(|_| candle_core::Error::Msg(format!("{what} = {v} exceeds i32")))
}

macro_rules! cuda_dtype {
    ($dt:expr, $f:ident ( $($arg:expr),* $(,)? )) => {
        match $dt {
            DType::F32 => $f::<f32>($($arg),*),
            DType::BF16 => $f::<bf16>($($arg),*),
            DType::F16 => $f::<f16>($($arg),*),
            dt => bail!("no CUDA kernel for {dt:?}"),
        }
    };
}

trait Ty: CudaDType + DeviceRepr + WithDType {}
impl<T: CudaDType + DeviceRepr + WithDType> Ty for T {}

// ---------------------------------------------------------------------------------------------
// Attention

/// Which query each row of a score block is, as the kernels take it (`fused::ScoreRows`, passed
/// as plain values so that this module imports nothing from `fused`).
#[derive(Debug, Clone, Copy)]
pub struct MaskRows {
    pub n: usize,
    pub q0: usize,
    pub causal: bool,
}

pub fn softmax_lse(s: &Tensor, scale: f64, rows: MaskRows) -> Result<(Tensor, Tensor)> {
    cuda_dtype!(s.dtype(), softmax_lse_t(s, scale, rows))
}

fn softmax_lse_t<T: Ty>(s: &Tensor, scale: f64, rows: MaskRows) -> Result<(Tensor, Tensor)> {
    let dev = device(s)?;
    let s = s.contiguous()?;
    let (b, r, k) = s.dims3()?;
    let nrows = b * r;
    let (ss, sl) = s.storage_and_layout();
    let sv = view::<T>(&ss, sl, "scores")?;
    let mut p = alloc::<T>(&dev, nrows * k)?;
    let mut lse = alloc::<f32>(&dev, nrows)?;
    let (rows_i, k_i) = (i32_of(nrows, "rows")?, i32_of(k, "keys")?);
    let (n_i, q0_i, causal) = (i32_of(rows.n, "n")?, i32_of(rows.q0, "q0")?, rows.causal as i32);
    let scale = scale as f32;
    launch!(
        &dev,
        Module::Attn,
        "attn_softmax_fwd",
        T::DTYPE,
        warp_rows(nrows),
        [&sv, &mut p, &mut lse, &rows_i, &k_i, &scale, &causal, &n_i, &q0_i,]
    );
    Ok((wrap(p, &dev, (b, r, k)), wrap(lse, &dev, nrows)))
}

/// A `[heads, L]` statistic as (storage view, row stride); copied if its columns are strided.
fn stat_view(t: &Tensor) -> Result<Tensor> {
    if t.stride()[1] == 1 {
        Ok(t.clone())
    } else {
        t.contiguous()
    }
}

pub fn softmax_backward(
    s: &Tensor,
    dp: &Tensor,
    lse: &Tensor,
    delta: &Tensor,
    scale: f64,
    rows: MaskRows,
) -> Result<(Tensor, Tensor)> {
    cuda_dtype!(s.dtype(), softmax_backward_t(s, dp, lse, delta, scale, rows))
}

fn softmax_backward_t<T: Ty>(
    s: &Tensor,
    dp: &Tensor,
    lse: &Tensor,
    delta: &Tensor,
    scale: f64,
    rows: MaskRows,
) -> Result<(Tensor, Tensor)> {
    let dev = device(s)?;
    let (s, dp, lse, delta) = (s.contiguous()?, dp.contiguous()?, stat_view(lse)?, stat_view(delta)?);
    let (b, r, k) = s.dims3()?;
    let nrows = b * r;
    let (ss, sl) = s.storage_and_layout();
    let (dps, dpl) = dp.storage_and_layout();
    let (ls, ll) = lse.storage_and_layout();
    let (ds_, dl) = delta.storage_and_layout();
    let sv = view::<T>(&ss, sl, "scores")?;
    let dpv = view::<T>(&dps, dpl, "dP")?;
    let lv = view_from::<f32>(&ls, ll, "lse")?;
    let dv = view_from::<f32>(&ds_, dl, "delta")?;
    let mut p = alloc::<T>(&dev, nrows * k)?;
    let mut ds = alloc::<T>(&dev, nrows * k)?;
    let (rows_i, k_i) = (i32_of(nrows, "rows")?, i32_of(k, "keys")?);
    let (n_i, q0_i, causal) = (i32_of(rows.n, "n")?, i32_of(rows.q0, "q0")?, rows.causal as i32);
    let (lse_ld, delta_ld) = (i32_of(lse.stride()[0], "lse stride")?, i32_of(delta.stride()[0], "delta stride")?);
    let scale = scale as f32;
    launch!(
        &dev,
        Module::Attn,
        "attn_softmax_bwd",
        T::DTYPE,
        warp_rows(nrows),
        [&sv, &dpv, &lv, &dv, &mut p, &mut ds, &rows_i, &k_i, &scale, &causal, &n_i, &q0_i, &lse_ld, &delta_ld,]
    );
    Ok((wrap(p, &dev, (b, r, k)), wrap(ds, &dev, (b, r, k))))
}

pub fn row_dot(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    cuda_dtype!(a.dtype(), row_dot_t(a, b))
}

fn row_dot_t<T: Ty>(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    let dev = device(a)?;
    let unit = |t: &Tensor| if t.stride()[2] == 1 { Ok(t.clone()) } else { t.contiguous() };
    let (a, b) = (unit(a)?, unit(b)?);
    let (h, l, d) = a.dims3()?;
    let (as_, al) = a.storage_and_layout();
    let (bs, bl) = b.storage_and_layout();
    let av = view_from::<T>(&as_, al, "a")?;
    let bv = view_from::<T>(&bs, bl, "b")?;
    let mut out = alloc::<f32>(&dev, h * l)?;
    let (h_i, l_i, d_i) = (i32_of(h, "heads")?, i32_of(l, "rows")?, i32_of(d, "dim")?);
    let (sah, sal) = (a.stride()[0] as i64, a.stride()[1] as i64);
    let (sbh, sbl) = (b.stride()[0] as i64, b.stride()[1] as i64);
    launch!(
        &dev,
        Module::Attn,
        "attn_rowdot",
        T::DTYPE,
        warp_rows(h * l),
        [&av, &bv, &mut out, &h_i, &l_i, &d_i, &sah, &sal, &sbh, &sbl,]
    );
    Ok(wrap(out, &dev, (h, l)))
}

pub fn attention_bwd_prep(dattn: &Tensor, attn: &Tensor, heads: usize) -> Result<(Tensor, Tensor)> {
    cuda_dtype!(dattn.dtype(), attention_bwd_prep_t(dattn, attn, heads))
}

fn attention_bwd_prep_t<T: Ty>(dattn: &Tensor, attn: &Tensor, heads: usize) -> Result<(Tensor, Tensor)> {
    let dev = device(dattn)?;
    let (g, o) = (dattn.contiguous()?, attn.contiguous()?);
    let (l, hd) = g.dims2()?;
    let d = hd / heads;
    let (gs, gl) = g.storage_and_layout();
    let (os, ol) = o.storage_and_layout();
    let gv = view::<T>(&gs, gl, "dattn")?;
    let ov = view::<T>(&os, ol, "attn")?;
    let mut dout = alloc::<T>(&dev, l * hd)?;
    let mut delta = alloc::<f32>(&dev, l * heads)?;
    let (l_i, h_i, d_i) = (i32_of(l, "rows")?, i32_of(heads, "heads")?, i32_of(d, "head dim")?);
    launch!(
        &dev,
        Module::Attn,
        "attn_bwd_prep",
        T::DTYPE,
        warp_rows(l * heads),
        [&gv, &ov, &mut dout, &mut delta, &l_i, &h_i, &d_i,]
    );
    Ok((wrap(dout, &dev, (heads, l, d)), wrap(delta, &dev, (heads, l))))
}

pub fn qk_norm_rope(
    x: &Tensor,
    w: &Tensor,
    cos: &Tensor,
    sin: &Tensor,
    heads: usize,
    eps: f64,
) -> Result<(Tensor, Tensor)> {
    cuda_dtype!(x.dtype(), qk_norm_rope_t(x, w, cos, sin, heads, eps))
}

fn qk_norm_rope_t<T: Ty>(
    x: &Tensor,
    w: &Tensor,
    cos: &Tensor,
    sin: &Tensor,
    heads: usize,
    eps: f64,
) -> Result<(Tensor, Tensor)> {
    let dev = device(x)?;
    let (x, w, cos, sin) = (x.contiguous()?, w.contiguous()?, cos.contiguous()?, sin.contiguous()?);
    let (l, hd) = x.dims2()?;
    let d = hd / heads;
    let (xs, xl) = x.storage_and_layout();
    let (ws, wl) = w.storage_and_layout();
    let (cs, cl) = cos.storage_and_layout();
    let (sn, snl) = sin.storage_and_layout();
    let xv = view::<T>(&xs, xl, "x")?;
    let wv = view::<T>(&ws, wl, "weight")?;
    let cv = view::<T>(&cs, cl, "cos")?;
    let sv = view::<T>(&sn, snl, "sin")?;
    let mut out = alloc::<T>(&dev, l * hd)?;
    let mut rstd = alloc::<f32>(&dev, l * heads)?;
    let (l_i, h_i, d_i) = (i32_of(l, "rows")?, i32_of(heads, "heads")?, i32_of(d, "head dim")?);
    let eps = eps as f32;
    launch!(
        &dev,
        Module::Attn,
        "qk_norm_rope_fwd",
        T::DTYPE,
        warp_rows(l * heads),
        [&xv, &wv, &cv, &sv, &mut out, &mut rstd, &l_i, &h_i, &d_i, &eps,]
    );
    Ok((wrap(out, &dev, (heads, l, d)), wrap(rstd, &dev, (l * heads, 1))))
}

pub fn qk_norm_rope_backward(
    g: &Tensor,
    x: &Tensor,
    rstd: &Tensor,
    w: &Tensor,
    cos: &Tensor,
    sin: &Tensor,
) -> Result<Tensor> {
    cuda_dtype!(x.dtype(), qk_norm_rope_backward_t(g, x, rstd, w, cos, sin))
}

fn qk_norm_rope_backward_t<T: Ty>(
    g: &Tensor,
    x: &Tensor,
    rstd: &Tensor,
    w: &Tensor,
    cos: &Tensor,
    sin: &Tensor,
) -> Result<Tensor> {
    let dev = device(x)?;
    let (g, x, rstd) = (g.contiguous()?, x.contiguous()?, rstd.contiguous()?);
    let (w, cos, sin) = (w.contiguous()?, cos.contiguous()?, sin.contiguous()?);
    let (h, l, d) = g.dims3()?;
    let (gs, gl) = g.storage_and_layout();
    let (xs, xl) = x.storage_and_layout();
    let (rs, rl) = rstd.storage_and_layout();
    let (ws, wl) = w.storage_and_layout();
    let (cs, cl) = cos.storage_and_layout();
    let (sn, snl) = sin.storage_and_layout();
    let gv = view::<T>(&gs, gl, "g")?;
    let xv = view::<T>(&xs, xl, "x")?;
    let rv = view::<f32>(&rs, rl, "rstd")?;
    let wv = view::<T>(&ws, wl, "weight")?;
    let cv = view::<T>(&cs, cl, "cos")?;
    let sv = view::<T>(&sn, snl, "sin")?;
    let mut dx = alloc::<T>(&dev, l * h * d)?;
    let (l_i, h_i, d_i) = (i32_of(l, "rows")?, i32_of(h, "heads")?, i32_of(d, "head dim")?);
    launch!(
        &dev,
        Module::Attn,
        "qk_norm_rope_bwd",
        T::DTYPE,
        warp_rows(l * h),
        [&gv, &xv, &rv, &wv, &cv, &sv, &mut dx, &l_i, &h_i, &d_i,]
    );
    Ok(wrap(dx, &dev, (l, h * d)))
}

pub fn vision_qkv_rope(qkv: &Tensor, cos: &Tensor, sin: &Tensor, heads: usize) -> Result<Tensor> {
    cuda_dtype!(qkv.dtype(), vision_qkv_rope_t(qkv, cos, sin, heads))
}

fn vision_qkv_rope_t<T: Ty>(qkv: &Tensor, cos: &Tensor, sin: &Tensor, heads: usize) -> Result<Tensor> {
    let dev = device(qkv)?;
    let (qkv, cos, sin) = (qkv.contiguous()?, cos.contiguous()?, sin.contiguous()?);
    let (n, c3) = qkv.dims2()?;
    let d = c3 / (3 * heads);
    let (xs, xl) = qkv.storage_and_layout();
    let (cs, cl) = cos.storage_and_layout();
    let (sn, snl) = sin.storage_and_layout();
    let xv = view::<T>(&xs, xl, "qkv")?;
    let cv = view::<f32>(&cs, cl, "cos")?;
    let sv = view::<f32>(&sn, snl, "sin")?;
    let mut out = alloc::<T>(&dev, n * c3)?;
    let (n_i, h_i, d_i) = (i32_of(n, "rows")?, i32_of(heads, "heads")?, i32_of(d, "head dim")?);
    launch!(
        &dev,
        Module::Attn,
        "vis_qkv_rope_fwd",
        T::DTYPE,
        grid(n * c3 / 2),
        [&xv, &cv, &sv, &mut out, &n_i, &h_i, &d_i,]
    );
    Ok(wrap(out, &dev, (3, heads, n, d)))
}

pub fn vision_qkv_rope_backward(dq: &Tensor, dk: &Tensor, dv: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    cuda_dtype!(dq.dtype(), vision_qkv_rope_backward_t(dq, dk, dv, cos, sin))
}

fn vision_qkv_rope_backward_t<T: Ty>(
    dq: &Tensor,
    dk: &Tensor,
    dv: &Tensor,
    cos: &Tensor,
    sin: &Tensor,
) -> Result<Tensor> {
    let dev = device(dq)?;
    let (dq, dk, dv) = (dq.contiguous()?, dk.contiguous()?, dv.contiguous()?);
    let (cos, sin) = (cos.contiguous()?, sin.contiguous()?);
    let (h, n, d) = dq.dims3()?;
    let (qs, ql) = dq.storage_and_layout();
    let (ks, kl) = dk.storage_and_layout();
    let (vs, vl) = dv.storage_and_layout();
    let (cs, cl) = cos.storage_and_layout();
    let (sn, snl) = sin.storage_and_layout();
    let qv = view::<T>(&qs, ql, "dq")?;
    let kv = view::<T>(&ks, kl, "dk")?;
    let vv = view::<T>(&vs, vl, "dv")?;
    let cv = view::<f32>(&cs, cl, "cos")?;
    let sv = view::<f32>(&sn, snl, "sin")?;
    let mut out = alloc::<T>(&dev, 3 * h * n * d)?;
    let (n_i, h_i, d_i) = (i32_of(n, "rows")?, i32_of(h, "heads")?, i32_of(d, "head dim")?);
    launch!(
        &dev,
        Module::Attn,
        "vis_qkv_rope_bwd",
        T::DTYPE,
        grid(3 * h * n * d / 2),
        [&qv, &kv, &vv, &cv, &sv, &mut out, &n_i, &h_i, &d_i,]
    );
    Ok(wrap(out, &dev, (n, 3 * h * d)))
}

// ---------------------------------------------------------------------------------------------
// Norms

type NormOut = (Tensor, Tensor, Option<Tensor>);

pub fn rms_norm(x: &Tensor, res: Option<&Tensor>, w: &Tensor, eps: f64) -> Result<NormOut> {
    cuda_dtype!(x.dtype(), rms_norm_t(x, res, w, eps))
}

fn stat_dims(x: &Tensor) -> Vec<usize> {
    let mut s = x.dims().to_vec();
    if let Some(last) = s.last_mut() {
        *last = 1;
    }
    s
}

fn rms_norm_t<T: Ty>(x: &Tensor, res: Option<&Tensor>, w: &Tensor, eps: f64) -> Result<NormOut> {
    let dev = device(x)?;
    let (x, w) = (x.contiguous()?, w.contiguous()?);
    let res = res.map(|r| r.contiguous()).transpose()?;
    let dd = x.dim(candle_core::D::Minus1)?;
    let rows = x.elem_count() / dd.max(1);
    let (xs, xl) = x.storage_and_layout();
    let (ws, wl) = w.storage_and_layout();
    let rg = res.as_ref().map(|r| r.storage_and_layout());
    let xv = view::<T>(&xs, xl, "x")?;
    let wv = view::<T>(&ws, wl, "weight")?;
    let rv = rg.as_ref().map(|(g, l)| view::<T>(g, l, "res")).transpose()?;
    let mut y = alloc::<T>(&dev, rows * dd)?;
    let mut rstd = alloc::<f32>(&dev, rows)?;
    let mut hsum = match res {
        Some(_) => Some(alloc::<T>(&dev, rows * dd)?),
        None => None,
    };
    let null = 0u64;
    let (rows_i, dd_i) = (i32_of(rows, "rows")?, i32_of(dd, "dim")?);
    let eps = eps as f32;
    let (tag, cfg) = norm_rows(rows, dd);
    let name = format!("rms_fwd_{tag}");
    {
        let f = kernel(&dev, Module::Norm, &name, T::DTYPE)?;
        let stream = dev.cuda_stream();
        let mut b = stream.launch_builder(&f);
        b.arg(&xv);
        arg_or_null(&mut b, rv.as_ref(), &null);
        b.arg(&wv);
        b.arg(&mut y);
        arg_or_null(&mut b, hsum.as_mut(), &null);
        b.arg(&mut rstd);
        b.arg(&rows_i);
        b.arg(&dd_i);
        b.arg(&eps);
        // SAFETY: arguments match rms_fwd_* (x, res|null, w, y, hsum|null, rstd, rows, dd, eps).
        unsafe { b.launch(cfg) }.w()?;
    }
    done(&dev, &name)?;
    let h = hsum.map(|h| wrap(h, &dev, x.dims()));
    Ok((wrap(y, &dev, x.dims()), wrap(rstd, &dev, stat_dims(&x)), h))
}

pub fn rms_norm_backward(
    x: &Tensor,
    rstd: &Tensor,
    w: &Tensor,
    dy: &[&Tensor],
    res: Option<&Tensor>,
) -> Result<Tensor> {
    cuda_dtype!(x.dtype(), rms_norm_backward_t(x, rstd, w, dy, res))
}

fn rms_norm_backward_t<T: Ty>(
    x: &Tensor,
    rstd: &Tensor,
    w: &Tensor,
    dy: &[&Tensor],
    res: Option<&Tensor>,
) -> Result<Tensor> {
    let dev = device(x)?;
    let (x, rstd, w) = (x.contiguous()?, rstd.contiguous()?, w.contiguous()?);
    let dys = dy.iter().map(|d| d.contiguous()).collect::<Result<Vec<_>>>()?;
    let res = res.map(|r| r.contiguous()).transpose()?;
    let dd = x.dim(candle_core::D::Minus1)?;
    let rows = x.elem_count() / dd.max(1);
    let (xs, xl) = x.storage_and_layout();
    let (rs, rl) = rstd.storage_and_layout();
    let (ws, wl) = w.storage_and_layout();
    let gg: Vec<_> = dys.iter().map(|d| d.storage_and_layout()).collect();
    let rg = res.as_ref().map(|r| r.storage_and_layout());
    let xv = view::<T>(&xs, xl, "x")?;
    let rsv = view::<f32>(&rs, rl, "rstd")?;
    let wv = view::<T>(&ws, wl, "weight")?;
    let gv = gg.iter().map(|(g, l)| view::<T>(g, l, "dy")).collect::<Result<Vec<_>>>()?;
    let rv = rg.as_ref().map(|(g, l)| view::<T>(g, l, "res")).transpose()?;
    let mut dx = alloc::<T>(&dev, rows * dd)?;
    let null = 0u64;
    let (rows_i, dd_i) = (i32_of(rows, "rows")?, i32_of(dd, "dim")?);
    let (tag, cfg) = norm_rows(rows, dd);
    let name = format!("rms_bwd_{tag}");
    {
        let f = kernel(&dev, Module::Norm, &name, T::DTYPE)?;
        let stream = dev.cuda_stream();
        let mut b = stream.launch_builder(&f);
        b.arg(&xv);
        b.arg(&rsv);
        b.arg(&wv);
        for i in 0..3 {
            arg_or_null(&mut b, gv.get(i), &null);
        }
        arg_or_null(&mut b, rv.as_ref(), &null);
        b.arg(&mut dx);
        b.arg(&rows_i);
        b.arg(&dd_i);
        // SAFETY: arguments match rms_bwd_* (x, rstd, w, dy, dy2|null, dy3|null, res|null, dx, rows, dd);
        // fused/norm.rs checked 1 ≤ dy.len() ≤ 3.
        unsafe { b.launch(cfg) }.w()?;
    }
    done(&dev, &name)?;
    Ok(wrap(dx, &dev, x.dims()))
}

type LnOut = (Tensor, Tensor, Tensor, Option<Tensor>);

pub fn layer_norm(x: &Tensor, res: Option<&Tensor>, w: &Tensor, b: &Tensor, eps: f64) -> Result<LnOut> {
    cuda_dtype!(x.dtype(), layer_norm_t(x, res, w, b, eps))
}

fn layer_norm_t<T: Ty>(x: &Tensor, res: Option<&Tensor>, w: &Tensor, bias: &Tensor, eps: f64) -> Result<LnOut> {
    let dev = device(x)?;
    let (x, w, bias) = (x.contiguous()?, w.contiguous()?, bias.contiguous()?);
    let res = res.map(|r| r.contiguous()).transpose()?;
    let dd = x.dim(candle_core::D::Minus1)?;
    let rows = x.elem_count() / dd.max(1);
    let (xs, xl) = x.storage_and_layout();
    let (ws, wl) = w.storage_and_layout();
    let (bs, bl) = bias.storage_and_layout();
    let rg = res.as_ref().map(|r| r.storage_and_layout());
    let xv = view::<T>(&xs, xl, "x")?;
    let wv = view::<T>(&ws, wl, "weight")?;
    let bv = view::<T>(&bs, bl, "bias")?;
    let rv = rg.as_ref().map(|(g, l)| view::<T>(g, l, "res")).transpose()?;
    let mut y = alloc::<T>(&dev, rows * dd)?;
    let mut mean = alloc::<f32>(&dev, rows)?;
    let mut rstd = alloc::<f32>(&dev, rows)?;
    let mut hsum = match res {
        Some(_) => Some(alloc::<T>(&dev, rows * dd)?),
        None => None,
    };
    let null = 0u64;
    let (rows_i, dd_i) = (i32_of(rows, "rows")?, i32_of(dd, "dim")?);
    let eps = eps as f32;
    let (tag, cfg) = norm_rows(rows, dd);
    let name = format!("ln_fwd_{tag}");
    {
        let f = kernel(&dev, Module::Norm, &name, T::DTYPE)?;
        let stream = dev.cuda_stream();
        let mut b = stream.launch_builder(&f);
        b.arg(&xv);
        arg_or_null(&mut b, rv.as_ref(), &null);
        b.arg(&wv);
        b.arg(&bv);
        b.arg(&mut y);
        arg_or_null(&mut b, hsum.as_mut(), &null);
        b.arg(&mut mean);
        b.arg(&mut rstd);
        b.arg(&rows_i);
        b.arg(&dd_i);
        b.arg(&eps);
        // SAFETY: arguments match ln_fwd_* (x, res|null, w, b, y, hsum|null, mean, rstd, rows, dd, eps).
        unsafe { b.launch(cfg) }.w()?;
    }
    done(&dev, &name)?;
    let h = hsum.map(|h| wrap(h, &dev, x.dims()));
    let sd = stat_dims(&x);
    Ok((wrap(y, &dev, x.dims()), wrap(mean, &dev, sd.clone()), wrap(rstd, &dev, sd), h))
}

pub fn layer_norm_backward(
    x: &Tensor,
    mean: &Tensor,
    rstd: &Tensor,
    w: &Tensor,
    dy: &Tensor,
    res: Option<&Tensor>,
) -> Result<Tensor> {
    cuda_dtype!(x.dtype(), layer_norm_backward_t(x, mean, rstd, w, dy, res))
}

fn layer_norm_backward_t<T: Ty>(
    x: &Tensor,
    mean: &Tensor,
    rstd: &Tensor,
    w: &Tensor,
    dy: &Tensor,
    res: Option<&Tensor>,
) -> Result<Tensor> {
    let dev = device(x)?;
    let (x, mean, rstd) = (x.contiguous()?, mean.contiguous()?, rstd.contiguous()?);
    let (w, dy) = (w.contiguous()?, dy.contiguous()?);
    let res = res.map(|r| r.contiguous()).transpose()?;
    let dd = x.dim(candle_core::D::Minus1)?;
    let rows = x.elem_count() / dd.max(1);
    let (xs, xl) = x.storage_and_layout();
    let (ms, ml) = mean.storage_and_layout();
    let (rs, rl) = rstd.storage_and_layout();
    let (ws, wl) = w.storage_and_layout();
    let (gs, gl) = dy.storage_and_layout();
    let rg = res.as_ref().map(|r| r.storage_and_layout());
    let xv = view::<T>(&xs, xl, "x")?;
    let mv = view::<f32>(&ms, ml, "mean")?;
    let rsv = view::<f32>(&rs, rl, "rstd")?;
    let wv = view::<T>(&ws, wl, "weight")?;
    let gv = view::<T>(&gs, gl, "dy")?;
    let rv = rg.as_ref().map(|(g, l)| view::<T>(g, l, "res")).transpose()?;
    let mut dx = alloc::<T>(&dev, rows * dd)?;
    let null = 0u64;
    let (rows_i, dd_i) = (i32_of(rows, "rows")?, i32_of(dd, "dim")?);
    let (tag, cfg) = norm_rows(rows, dd);
    let name = format!("ln_bwd_{tag}");
    {
        let f = kernel(&dev, Module::Norm, &name, T::DTYPE)?;
        let stream = dev.cuda_stream();
        let mut b = stream.launch_builder(&f);
        b.arg(&xv);
        b.arg(&mv);
        b.arg(&rsv);
        b.arg(&wv);
        b.arg(&gv);
        arg_or_null(&mut b, rv.as_ref(), &null);
        b.arg(&mut dx);
        b.arg(&rows_i);
        b.arg(&dd_i);
        // SAFETY: arguments match ln_bwd_* (x, mean, rstd, w, dy, res|null, dx, rows, dd).
        unsafe { b.launch(cfg) }.w()?;
    }
    done(&dev, &name)?;
    Ok(wrap(dx, &dev, x.dims()))
}

// ---------------------------------------------------------------------------------------------
// Activations

fn binary_t<T: Ty>(name: &str, a: &Tensor, b: &Tensor) -> Result<Tensor> {
    let dev = device(a)?;
    let (a, b) = (a.contiguous()?, b.contiguous()?);
    let n = a.elem_count();
    let (as_, al) = a.storage_and_layout();
    let (bs, bl) = b.storage_and_layout();
    let av = view::<T>(&as_, al, "a")?;
    let bv = view::<T>(&bs, bl, "b")?;
    let mut out = alloc::<T>(&dev, n)?;
    launch!(&dev, Module::Act, name, T::DTYPE, grid(n), [&av, &bv, &mut out, &n]);
    Ok(wrap(out, &dev, a.dims()))
}

pub fn gelu_tanh_backward(x: &Tensor, dy: &Tensor) -> Result<Tensor> {
    cuda_dtype!(x.dtype(), binary_t("gelu_tanh_bwd", x, dy))
}

pub fn gelu_erf_backward(x: &Tensor, dy: &Tensor) -> Result<Tensor> {
    cuda_dtype!(x.dtype(), binary_t("gelu_erf_bwd", x, dy))
}

pub fn swiglu(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    cuda_dtype!(gate.dtype(), binary_t("swiglu_fwd", gate, up))
}

pub fn swiglu_backward(gate: &Tensor, up: &Tensor, dm: &Tensor) -> Result<(Tensor, Tensor)> {
    cuda_dtype!(gate.dtype(), swiglu_backward_t(gate, up, dm))
}

fn swiglu_backward_t<T: Ty>(gate: &Tensor, up: &Tensor, dm: &Tensor) -> Result<(Tensor, Tensor)> {
    let dev = device(gate)?;
    let (g, u, dm) = (gate.contiguous()?, up.contiguous()?, dm.contiguous()?);
    let n = g.elem_count();
    let (gs, gl) = g.storage_and_layout();
    let (us, ul) = u.storage_and_layout();
    let (ds, dl) = dm.storage_and_layout();
    let gv = view::<T>(&gs, gl, "gate")?;
    let uv = view::<T>(&us, ul, "up")?;
    let dv = view::<T>(&ds, dl, "dm")?;
    let mut dg = alloc::<T>(&dev, n)?;
    let mut du = alloc::<T>(&dev, n)?;
    launch!(&dev, Module::Act, "swiglu_bwd", T::DTYPE, grid(n), [&gv, &uv, &dv, &mut dg, &mut du, &n]);
    Ok((wrap(dg, &dev, g.dims()), wrap(du, &dev, g.dims())))
}
