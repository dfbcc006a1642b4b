//! The device: adapter choice, error capture, device loss, the buffer pool and read-back.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use crate::error::{Error, GpuErrorKind, Result};

/// An opened adapter and device, with what went wrong outside our error scopes.
pub(crate) struct Context {
    pub device: wgpu::Device,
    pub queue: wgpu::Queue,
    pub info: wgpu::AdapterInfo,
    pub limits: wgpu::Limits,
    /// Set by the device-lost callback: after it, every call fails with `DeviceLost`.
    lost: Arc<Mutex<Option<String>>>,
    pool: BufferPool,
}

fn gpu_error(kind: GpuErrorKind, message: impl Into<String>) -> Error {
    Error::Gpu {
        kind,
        message: message.into(),
    }
}

/// Picks the adapter the usual wgpu environment variables ask for: `WGPU_BACKEND` (through
/// the instance descriptor), `WGPU_ADAPTER_NAME` (a case-insensitive substring of the name)
/// and `WGPU_POWER_PREF`.
async fn choose_adapter(instance: &wgpu::Instance) -> Result<wgpu::Adapter> {
    if let Ok(wanted) = std::env::var("WGPU_ADAPTER_NAME") {
        let wanted = wanted.to_lowercase();
        let adapters = instance.enumerate_adapters(wgpu::Backends::all()).await;
        let names: Vec<String> = adapters.iter().map(|a| a.get_info().name).collect();
        return adapters
            .into_iter()
            .find(|a| a.get_info().name.to_lowercase().contains(&wanted))
            .ok_or_else(|| {
                Error::NoAdapter(format!(
                    "WGPU_ADAPTER_NAME={wanted} matches none of the adapters {names:?}"
                ))
            });
    }
    let options = wgpu::RequestAdapterOptions {
        power_preference: wgpu::PowerPreference::from_env()
            .unwrap_or(wgpu::PowerPreference::HighPerformance),
        force_fallback_adapter: false,
        compatible_surface: None,
        ..Default::default()
    };
    instance
        .request_adapter(&options)
        .await
        .map_err(|e| Error::NoAdapter(e.to_string()))
}

impl Context {
    /// Opens the adapter the environment asks for (or the default one) with all its limits.
    pub async fn open() -> Result<Context> {
        let mut descriptor = wgpu::InstanceDescriptor::new_without_display_handle_from_env();
        if std::env::var_os("WGPU_BACKEND").is_none() {
            // Vulkan, Metal and DX12 unless asked otherwise: a GL adapter is slower, and probing
            // GL without a display prints EGL errors that would alarm a user for nothing.
            descriptor.backends = wgpu::Backends::PRIMARY;
        }
        let instance = wgpu::Instance::new(descriptor);
        let adapter = choose_adapter(&instance).await?;
        let info = adapter.get_info();
        log::debug!("soft-topk: GPU adapter {} ({:?})", info.name, info.backend);

        // All the adapter offers: the storage-binding and workgroup-memory limits decide how
        // batches are split, so the defaults (128 MiB, 16 KiB) would only cost parts.
        let descriptor = wgpu::DeviceDescriptor {
            label: Some("soft-topk device"),
            required_features: wgpu::Features::empty(),
            required_limits: adapter.limits(),
            experimental_features: wgpu::ExperimentalFeatures::disabled(),
            memory_hints: wgpu::MemoryHints::Performance,
            trace: wgpu::Trace::Off,
        };
        let (device, queue) = adapter
            .request_device(&descriptor)
            .await
            .map_err(|e| Error::NoAdapter(format!("{}: {e}", info.name)))?;
        let limits = device.limits();

        let lost = Arc::new(Mutex::new(None));
        let lost_flag = Arc::clone(&lost);
        device.set_device_lost_callback(move |reason, message| {
            log::error!("soft-topk: GPU device lost ({reason:?}): {message}");
            if let Ok(mut slot) = lost_flag.lock() {
                *slot = Some(format!("{reason:?}: {message}"));
            }
        });
        // Everything we submit runs inside error scopes; anything that escapes them is logged
        // here rather than panicking the caller's thread (wgpu's default handler panics).
        device.on_uncaptured_error(Arc::new(|e: wgpu::Error| {
            log::error!("soft-topk: uncaptured GPU error: {e}");
        }));

        Ok(Context {
            device,
            queue,
            info,
            limits,
            lost,
            pool: BufferPool::default(),
        })
    }

    /// The device-lost message, if the device is gone.
    pub fn lost(&self) -> Option<String> {
        self.lost.lock().ok().and_then(|slot| slot.clone())
    }

    /// `Err(DeviceLost)` once the device is gone.
    pub fn check_alive(&self) -> Result<()> {
        match self.lost() {
            Some(why) => Err(gpu_error(GpuErrorKind::DeviceLost, why)),
            None => Ok(()),
        }
    }

    /// Runs `work` (buffer writes, encoding, submission) inside error scopes for validation,
    /// out-of-memory and internal errors, and turns what they caught into a typed error.
    /// Scopes are per thread in wgpu, so concurrent callers do not see each other's errors.
    pub fn scoped<T>(&self, work: impl FnOnce() -> T) -> Result<T> {
        self.check_alive()?;
        let internal = self.device.push_error_scope(wgpu::ErrorFilter::Internal);
        let memory = self.device.push_error_scope(wgpu::ErrorFilter::OutOfMemory);
        let validation = self.device.push_error_scope(wgpu::ErrorFilter::Validation);
        let value = work();
        // Scopes pop in reverse order of their pushes.
        let caught = [
            pollster::block_on(validation.pop()),
            pollster::block_on(memory.pop()),
            pollster::block_on(internal.pop()),
        ];
        if let Some(e) = caught.into_iter().flatten().next() {
            return Err(self.classify(e));
        }
        self.check_alive()?;
        Ok(value)
    }

    fn classify(&self, e: wgpu::Error) -> Error {
        if let Some(why) = self.lost() {
            return gpu_error(GpuErrorKind::DeviceLost, why);
        }
        match e {
            wgpu::Error::OutOfMemory { .. } => gpu_error(GpuErrorKind::OutOfMemory, e.to_string()),
            wgpu::Error::Validation { .. } => gpu_error(GpuErrorKind::Validation, e.to_string()),
            wgpu::Error::Internal { .. } => gpu_error(GpuErrorKind::Internal, e.to_string()),
        }
    }

    /// Waits for the queue and copies `size` bytes out of a mappable staging buffer.
    pub fn read_back(&self, staging: &wgpu::Buffer, size: u64) -> Result<Vec<u8>> {
        let (sender, receiver) = futures_intrusive::channel::shared::oneshot_channel();
        staging.map_async(wgpu::MapMode::Read, 0..size, move |result| {
            // The receiver lives until this function returns; a closed channel only means
            // nobody waits any more.
            let _ = sender.send(result);
        });
        self.device
            .poll(wgpu::PollType::wait_indefinitely())
            .map_err(|e| match self.lost() {
                Some(why) => gpu_error(GpuErrorKind::DeviceLost, why),
                None => gpu_error(GpuErrorKind::Internal, format!("waiting for the GPU: {e}")),
            })?;
        match pollster::block_on(receiver.receive()) {
            Some(Ok(())) => {}
            Some(Err(e)) => {
                self.check_alive()?;
                return Err(gpu_error(GpuErrorKind::Internal, format!("read-back: {e}")));
            }
            None => {
                self.check_alive()?;
                return Err(gpu_error(
                    GpuErrorKind::Internal,
                    "read-back never completed",
                ));
            }
        }
        let bytes = {
            let view = staging
                .get_mapped_range(0..size)
                .map_err(|e| gpu_error(GpuErrorKind::Internal, format!("mapping: {e}")))?;
            view.to_vec()
        };
        staging.unmap();
        Ok(bytes)
    }

    /// A buffer of at least `size` bytes for `use_`, from the pool or new.
    pub fn take(&self, use_: BufferUse, size: u64) -> Pooled {
        self.pool.take(&self.device, &self.limits, use_, size)
    }

    /// Returns buffers to the pool for the next call.
    pub fn give_back(&self, buffers: impl IntoIterator<Item = Pooled>) {
        self.pool.give_back(buffers)
    }
}

/// What a pooled buffer is for; each use has its own usage flags and its own shelves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum BufferUse {
    /// Read by kernels, written by the host.
    Input,
    /// Written by kernels, copied out.
    Output,
    /// Mappable, for read-back.
    Staging,
}

impl BufferUse {
    fn usage(self) -> wgpu::BufferUsages {
        use wgpu::BufferUsages as U;
        match self {
            BufferUse::Input => U::STORAGE | U::COPY_DST,
            BufferUse::Output => U::STORAGE | U::COPY_SRC,
            BufferUse::Staging => U::MAP_READ | U::COPY_DST,
        }
    }

    fn label(self) -> &'static str {
        match self {
            BufferUse::Input => "soft-topk input",
            BufferUse::Output => "soft-topk output",
            BufferUse::Staging => "soft-topk staging",
        }
    }
}

/// A buffer on loan from the pool, with the shelf it goes back to.
pub(crate) struct Pooled {
    pub buffer: wgpu::Buffer,
    key: (BufferUse, u64),
}

/// Buffers kept between calls, by use and size class (powers of two from 256 bytes), so that
/// steady-state calls allocate nothing. Behind a mutex: several threads may share a backend.
#[derive(Default)]
struct BufferPool {
    shelves: Mutex<HashMap<(BufferUse, u64), Vec<wgpu::Buffer>>>,
}

/// Buffers kept per shelf; more are dropped when returned (enough for a few threads at once).
const SHELF_DEPTH: usize = 4;

impl BufferPool {
    fn take(
        &self,
        device: &wgpu::Device,
        limits: &wgpu::Limits,
        use_: BufferUse,
        size: u64,
    ) -> Pooled {
        // A size class rounded past the device's largest buffer falls back to the exact size.
        let mut class = size.max(256).next_power_of_two();
        if class > limits.max_buffer_size {
            class = size.max(4).next_multiple_of(wgpu::COPY_BUFFER_ALIGNMENT);
        }
        let key = (use_, class);
        let shelved = self
            .shelves
            .lock()
            .ok()
            .and_then(|mut shelves| shelves.get_mut(&key).and_then(Vec::pop));
        let buffer = shelved.unwrap_or_else(|| {
            log::trace!("soft-topk: new {} buffer of {class} bytes", use_.label());
            device.create_buffer(&wgpu::BufferDescriptor {
                label: Some(use_.label()),
                size: class,
                usage: use_.usage(),
                mapped_at_creation: false,
            })
        });
        Pooled { buffer, key }
    }

    fn give_back(&self, buffers: impl IntoIterator<Item = Pooled>) {
        let Ok(mut shelves) = self.shelves.lock() else {
            return;
        };
        for pooled in buffers {
            let shelf = shelves.entry(pooled.key).or_default();
            if shelf.len() < SHELF_DEPTH {
                shelf.push(pooled.buffer);
            }
        }
    }
}
