//! What a workload runs against: allocations, the copies a CUDA programmer would write, and
//! launches. The same workload code makes the managed run and the explicit-copy baseline; the
//! mode decides what [`Exec::input`], [`Exec::output`] and [`Exec::on_device`] do:
//!
//! | call            | managed, no advice | managed, `prefetch` | managed, `read-mostly` | explicit            |
//! |-----------------|--------------------|---------------------|------------------------|---------------------|
//! | `input(x)`      | nothing (faults)   | prefetch x → device | x read-mostly          | prefetch x → device |
//! | `output(x)`     | nothing (CPU faults when read) | prefetch x → CPU | nothing       | prefetch x → CPU    |
//! | `on_device(x)`  | nothing            | prefetch x → device | nothing                | prefetch x → device (never populated: nothing crosses the link, `cudaMalloc`) |
//!
//! A prefetch moves exactly the pages asked for and is charged on the device's link model,
//! with no fault-service cost: a `cudaMemcpy` over the same link.

use std::sync::Arc;

use hetmem_core::{link::ModelTime, DeviceId, PageRange};
use hetmem_runtime::{Advice, Context, Managed, Processor};
use hetmem_sim::accel::Kernel;

use crate::model::{DeviceModel, Work};
use crate::preset::{Advise, Mode};
use crate::WorkloadError;

/// A launch finished: what observers (progress bars, `inspect --at`) are shown.
#[derive(Debug)]
pub struct Step<'a> {
    /// Launches finished so far, this one included.
    pub index: u64,
    /// The kernel's name.
    pub kernel: &'static str,
    /// The context.
    pub ctx: &'a Context,
    /// The workload's allocations, by name.
    pub allocs: &'a [(String, PageRange)],
}

/// An observer of finished launches.
pub type Observer<'a> = &'a mut dyn FnMut(&Step<'_>);

/// A workload's view of its run.
pub struct Exec<'a, 'o> {
    ctx: &'a Context,
    dev: DeviceId,
    mode: Mode,
    advise: Advise,
    model: DeviceModel,
    allocs: Vec<(String, PageRange)>,
    launches: u64,
    work: Work,
    compute: ModelTime,
    /// The device clock's elapsed time (its compute included) when the last launch finished.
    clock_at_last_launch: Option<ModelTime>,
    observer: Option<Observer<'o>>,
}

impl std::fmt::Debug for Exec<'_, '_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Exec")
            .field("mode", &self.mode)
            .field("advise", &self.advise)
            .field("launches", &self.launches)
            .finish_non_exhaustive()
    }
}

impl<'a, 'o> Exec<'a, 'o> {
    /// Runs on the first device of `ctx` in `mode` (managed or explicit).
    pub fn new(
        ctx: &'a Context,
        mode: Mode,
        advise: Advise,
        model: DeviceModel,
        observer: Option<Observer<'o>>,
    ) -> Result<Self, WorkloadError> {
        let dev = *ctx.devices().first().ok_or(WorkloadError::Runtime(
            hetmem_runtime::RuntimeError::NoDevices,
        ))?;
        Ok(Exec {
            ctx,
            dev,
            mode,
            advise,
            model,
            allocs: Vec::new(),
            launches: 0,
            work: Work::default(),
            compute: ModelTime::ZERO,
            clock_at_last_launch: None,
            observer,
        })
    }

    /// The context.
    pub fn ctx(&self) -> &Context {
        self.ctx
    }

    /// The device.
    pub fn device(&self) -> DeviceId {
        self.dev
    }

    /// The allocations so far, by name.
    pub fn allocs(&self) -> &[(String, PageRange)] {
        &self.allocs
    }

    /// Launches so far.
    pub fn launches(&self) -> u64 {
        self.launches
    }

    /// Work of the launches so far.
    pub fn work(&self) -> Work {
        self.work
    }

    /// Modelled compute time of the launches so far ([`DeviceModel::time`]).
    pub fn compute(&self) -> ModelTime {
        self.compute
    }

    /// The device clock's elapsed time (its compute included) when the last launch finished.
    pub fn clock_at_last_launch(&self) -> Option<ModelTime> {
        self.clock_at_last_launch
    }

    /// Allocates `bytes` of managed memory named `name` (zeroed, never touched).
    pub fn alloc(&mut self, name: &str, bytes: u64) -> Result<Managed, WorkloadError> {
        let m = self.ctx.alloc(bytes)?;
        self.allocs.push((name.to_owned(), m.range()));
        Ok(m)
    }

    fn prefetch(&self, m: &Managed, to: Processor) -> Result<(), WorkloadError> {
        let _span = tracing::debug_span!(
            target: "hetmem_workloads::exec",
            "copy",
            to = match to {
                Processor::Cpu => "cpu",
                Processor::Device(_) => "device",
            },
            bytes = m.len()
        )
        .entered();
        self.ctx.prefetch(m.range(), to)?.wait()?;
        Ok(())
    }

    /// `x` is read by the launches that follow (`cudaMemcpy` host to device).
    pub fn input(&mut self, m: &Managed) -> Result<(), WorkloadError> {
        match (self.mode, self.advise) {
            (Mode::Explicit, _) | (Mode::Managed, Advise::Prefetch) => {
                self.prefetch(m, Processor::Device(self.dev))
            }
            (Mode::Managed, Advise::ReadMostly) => {
                self.ctx.advise(m.range(), Advice::SetReadMostly)?;
                Ok(())
            }
            _ => Ok(()),
        }
    }

    /// `x` is read by the CPU next (`cudaMemcpy` device to host).
    pub fn output(&mut self, m: &Managed) -> Result<(), WorkloadError> {
        match (self.mode, self.advise) {
            (Mode::Explicit, _) | (Mode::Managed, Advise::Prefetch) => {
                self.prefetch(m, Processor::Cpu)
            }
            _ => Ok(()),
        }
    }

    /// `x` is written by the device before anything reads it (`cudaMalloc` of an output).
    pub fn on_device(&mut self, m: &Managed) -> Result<(), WorkloadError> {
        match (self.mode, self.advise) {
            (Mode::Explicit, _) | (Mode::Managed, Advise::Prefetch) => {
                self.prefetch(m, Processor::Device(self.dev))
            }
            _ => Ok(()),
        }
    }

    /// Launches `kernel` over `threads` threads and waits for it; `work` is what it does, for
    /// the compute model.
    pub fn launch(
        &mut self,
        name: &'static str,
        kernel: Arc<dyn Kernel>,
        threads: u64,
        work: Work,
    ) -> Result<(), WorkloadError> {
        let acc = self.ctx.device(self.dev)?;
        {
            let _span = tracing::debug_span!(
                target: "hetmem_workloads::exec",
                "kernel",
                name,
                threads,
                index = self.launches
            )
            .entered();
            let mark = acc.launch_mark();
            self.ctx.launch(self.dev, kernel, threads)?.wait()?;
            // The kernel's compute goes on the device's timeline: after what held its warps
            // up, beside the background work that did not.
            acc.launch_computed(mark, self.model.time(work));
        }
        self.launches += 1;
        self.clock_at_last_launch = Some(acc.clock().elapsed);
        self.work += work;
        self.compute = self.compute.saturating_add(self.model.time(work));
        if let Some(obs) = self.observer.as_mut() {
            obs(&Step {
                index: self.launches,
                kernel: name,
                ctx: self.ctx,
                allocs: &self.allocs,
            });
        }
        Ok(())
    }
}
