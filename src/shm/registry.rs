//! The regions registered, per tenant, and their limits: a tenant's count
//! and bytes, the server's mapped bytes, the idle lease. A tenant only ever
//! reaches its own table, so another tenant's region is NOT_FOUND exactly as
//! a name never registered. A region found broken (its object unlinked or
//! truncated) is removed from the table when found; its mapping goes when the
//! last call using it ends.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use super::cuda_ipc::{self, CudaRange, CudaRegion};
use super::region::{Range, Region};
use super::{check_name, RangeRequest, ShmError};

/// The shared-memory options in force.
#[derive(Debug, Clone)]
pub struct ShmLimits {
    pub enabled: bool,
    /// Where the objects are (/dev/shm).
    pub dir: PathBuf,
    /// Most bytes mapped at once, every tenant's together.
    pub max_bytes: u64,
    pub tenant_max_regions: u64,
    pub tenant_max_bytes: u64,
    /// Unused this long, a region is unregistered; None: never.
    pub idle: Option<Duration>,
}

/// A region as Status reports it.
#[derive(Debug, Clone, PartialEq)]
pub struct RegionInfo {
    pub name: String,
    pub offset: u64,
    pub byte_size: u64,
    pub idle: Duration,
    /// The CUDA device of a CUDA IPC region; None for a POSIX object.
    pub cuda_device: Option<usize>,
}

/// What a region maps: a POSIX object, or GPU memory through CUDA IPC.
#[derive(Clone)]
enum Mapping {
    Posix(Arc<Region>),
    Cuda(Arc<CudaRegion>),
}

impl Mapping {
    fn name(&self) -> &str {
        match self {
            Mapping::Posix(region) => region.name(),
            Mapping::Cuda(region) => region.name(),
        }
    }

    fn offset(&self) -> u64 {
        match self {
            Mapping::Posix(region) => region.offset(),
            Mapping::Cuda(region) => region.offset(),
        }
    }

    fn byte_size(&self) -> u64 {
        match self {
            Mapping::Posix(region) => region.byte_size(),
            Mapping::Cuda(region) => region.byte_size(),
        }
    }

    /// A POSIX object's checks before a use; GPU memory has none the
    /// server can make (its owner keeps it allocated while registered).
    fn check_intact(&self) -> Result<(), ShmError> {
        match self {
            Mapping::Posix(region) => region.check_intact(),
            Mapping::Cuda(_) => Ok(()),
        }
    }
}

/// A range of either kind of region, checked.
#[derive(Clone, Debug)]
pub enum AnyRange {
    Posix(Range),
    Cuda(CudaRange),
}

struct Entry {
    region: Mapping,
    last_used: Instant,
}

impl Entry {
    fn info(&self, now: Instant) -> RegionInfo {
        RegionInfo {
            name: self.region.name().to_owned(),
            offset: self.region.offset(),
            byte_size: self.region.byte_size(),
            idle: now.saturating_duration_since(self.last_used),
            cuda_device: match &self.region {
                Mapping::Posix(_) => None,
                Mapping::Cuda(region) => Some(region.device()),
            },
        }
    }
}

#[derive(Default)]
struct Tables {
    tenants: HashMap<String, BTreeMap<String, Entry>>,
    mapped_bytes: u64,
    regions: u64,
}

impl Tables {
    /// Adds `tenant`'s new region `name` (its room was checked).
    fn insert(&mut self, tenant: &str, name: &str, region: Mapping, now: Instant) -> RegionInfo {
        let byte_size = region.byte_size();
        let entry = Entry {
            region,
            last_used: now,
        };
        let info = entry.info(now);
        self.tenants
            .entry(tenant.to_owned())
            .or_default()
            .insert(name.to_owned(), entry);
        self.mapped_bytes += byte_size;
        self.regions += 1;
        info
    }

    fn remove(&mut self, tenant: &str, name: &str) -> bool {
        let Some(table) = self.tenants.get_mut(tenant) else {
            return false;
        };
        let Some(entry) = table.remove(name) else {
            return false;
        };
        self.mapped_bytes = self.mapped_bytes.saturating_sub(entry.region.byte_size());
        self.regions = self.regions.saturating_sub(1);
        if table.is_empty() {
            self.tenants.remove(tenant);
        }
        true
    }
}

/// Every tenant's registered regions.
pub struct SharedMemory {
    limits: ShmLimits,
    tables: Mutex<Tables>,
}

impl std::fmt::Debug for SharedMemory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedMemory")
            .field("limits", &self.limits)
            .finish_non_exhaustive()
    }
}

impl SharedMemory {
    pub fn new(limits: ShmLimits) -> SharedMemory {
        SharedMemory {
            limits,
            tables: Mutex::new(Tables::default()),
        }
    }

    pub fn limits(&self) -> &ShmLimits {
        &self.limits
    }

    /// The table; a poisoned lock still holds consistent totals (every
    /// update is made under it without a panic in between), so it is used.
    fn tables(&self) -> MutexGuard<'_, Tables> {
        self.tables.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn check_enabled(&self) -> Result<(), ShmError> {
        if self.limits.enabled {
            Ok(())
        } else {
            Err(ShmError::Unavailable(
                "the server runs with --shared-memory off".into(),
            ))
        }
    }

    /// Registers (maps) `byte_size` bytes of /dev/shm/`name` from `offset`
    /// for `tenant`; true when the same region was already registered.
    pub fn register(
        &self,
        tenant: &str,
        name: &str,
        offset: u64,
        byte_size: u64,
    ) -> Result<(RegionInfo, bool), ShmError> {
        self.check_enabled()?;
        check_name(name)?;
        if byte_size == 0 {
            return Err(ShmError::InvalidArgument(
                "byte_size must be at least 1".into(),
            ));
        }
        let now = Instant::now();
        let mut tables = self.tables();
        let existing = tables
            .tenants
            .get(tenant)
            .and_then(|table| table.get(name))
            .map(|entry| entry.region.clone());
        if let Some(mapping) = existing {
            let Mapping::Posix(region) = mapping else {
                return Err(ShmError::AlreadyExists(name.to_owned()));
            };
            let same_object = std::fs::symlink_metadata(self.limits.dir.join(name))
                .map(|meta| {
                    use std::os::unix::fs::MetadataExt;
                    region.is_object(meta.dev(), meta.ino())
                })
                .unwrap_or(false);
            if region.check_intact().is_err() {
                // Broken: replaced by the new registration below.
                tables.remove(tenant, name);
            } else if same_object && region.offset() == offset && region.byte_size() == byte_size {
                let table = tables.tenants.entry(tenant.to_owned()).or_default();
                let Some(entry) = table.get_mut(name) else {
                    return Err(ShmError::NotFound(name.to_owned()));
                };
                entry.last_used = now;
                return Ok((entry.info(now), true));
            } else {
                return Err(ShmError::AlreadyExists(name.to_owned()));
            }
        }
        self.check_room(&tables, tenant, byte_size)?;
        let region = Region::open(&self.limits.dir, name, offset, byte_size)?;
        Ok((
            tables.insert(tenant, name, Mapping::Posix(Arc::new(region)), now),
            false,
        ))
    }

    /// Registers (opens) `byte_size` bytes from `offset` of the GPU memory
    /// `handle` (a cudaIpcMemHandle_t) exports on CUDA device `device`, as
    /// `name` of `tenant`; true when the same region was already registered.
    pub fn register_cuda(
        &self,
        tenant: &str,
        name: &str,
        handle: &[u8],
        device: u32,
        offset: u64,
        byte_size: u64,
    ) -> Result<(RegionInfo, bool), ShmError> {
        self.check_enabled()?;
        check_name(name)?;
        let handle = cuda_ipc::check_handle(handle)?;
        if byte_size == 0 {
            return Err(ShmError::InvalidArgument(
                "byte_size must be at least 1".into(),
            ));
        }
        // The name already registered (the same region: its lease restarts),
        // or room for a new one.
        let registered = |tables: &mut Tables| -> Result<Option<RegionInfo>, ShmError> {
            let now = Instant::now();
            let existing = tables
                .tenants
                .get_mut(tenant)
                .and_then(|table| table.get_mut(name));
            if let Some(entry) = existing {
                let same = match &entry.region {
                    Mapping::Cuda(region) => {
                        region.is_handle(&handle, device)
                            && region.offset() == offset
                            && region.byte_size() == byte_size
                    }
                    Mapping::Posix(_) => false,
                };
                if !same {
                    return Err(ShmError::AlreadyExists(name.to_owned()));
                }
                entry.last_used = now;
                return Ok(Some(entry.info(now)));
            }
            self.check_room(tables, tenant, byte_size)?;
            Ok(None)
        };
        if let Some(info) = registered(&mut self.tables())? {
            return Ok((info, true));
        }
        // Opened without the table's lock: the first CUDA call of the
        // process initializes the device (hundreds of milliseconds), which
        // must not hold up other tenants' calls. Checked again after; a
        // region opened in vain is closed when dropped.
        let region = CudaRegion::open(name, handle, device, offset, byte_size)?;
        let mut tables = self.tables();
        if let Some(info) = registered(&mut tables)? {
            return Ok((info, true));
        }
        Ok((
            tables.insert(
                tenant,
                name,
                Mapping::Cuda(Arc::new(region)),
                Instant::now(),
            ),
            false,
        ))
    }

    /// Refuses a new region of `byte_size` bytes over the tenant's or the
    /// server's limits.
    fn check_room(&self, tables: &Tables, tenant: &str, byte_size: u64) -> Result<(), ShmError> {
        let (count, bytes) = tables.tenants.get(tenant).map_or((0, 0), |table| {
            (
                table.len() as u64,
                table.values().map(|e| e.region.byte_size()).sum::<u64>(),
            )
        });
        if count >= self.limits.tenant_max_regions {
            return Err(ShmError::LimitExceeded(format!(
                "the tenant has {count} shared memory regions registered, the limit (--tenant-shared-memory-max-regions)"
            )));
        }
        if bytes.saturating_add(byte_size) > self.limits.tenant_max_bytes {
            return Err(ShmError::LimitExceeded(format!(
                "registering {byte_size} bytes would exceed the tenant's {} bytes of shared memory regions (--tenant-shared-memory-max-bytes; {bytes} registered)",
                self.limits.tenant_max_bytes
            )));
        }
        if tables.mapped_bytes.saturating_add(byte_size) > self.limits.max_bytes {
            return Err(ShmError::LimitExceeded(format!(
                "mapping {byte_size} bytes would exceed the server's {} bytes of shared memory regions (--shared-memory-max-bytes)",
                self.limits.max_bytes
            )));
        }
        Ok(())
    }

    /// Unregisters `name` of `tenant`, or all its regions (None); how many.
    pub fn unregister(&self, tenant: &str, name: Option<&str>) -> Result<u64, ShmError> {
        self.check_enabled()?;
        let mut tables = self.tables();
        match name {
            Some(name) => {
                check_name(name)?;
                if tables.remove(tenant, name) {
                    Ok(1)
                } else {
                    Err(ShmError::NotFound(name.to_owned()))
                }
            }
            None => {
                let names: Vec<String> = tables
                    .tenants
                    .get(tenant)
                    .map(|table| table.keys().cloned().collect())
                    .unwrap_or_default();
                for name in &names {
                    tables.remove(tenant, name);
                }
                Ok(names.len() as u64)
            }
        }
    }

    /// `tenant`'s regions: `name`, or all of them (None).
    pub fn status(&self, tenant: &str, name: Option<&str>) -> Result<Vec<RegionInfo>, ShmError> {
        self.check_enabled()?;
        let now = Instant::now();
        let tables = self.tables();
        let table = tables.tenants.get(tenant);
        match name {
            Some(name) => {
                check_name(name)?;
                table
                    .and_then(|t| t.get(name))
                    .map(|entry| vec![entry.info(now)])
                    .ok_or_else(|| ShmError::NotFound(name.to_owned()))
            }
            None => Ok(table
                .map(|t| t.values().map(|e| e.info(now)).collect())
                .unwrap_or_default()),
        }
    }

    /// The range `request` names in `tenant`'s POSIX regions (see
    /// [`Self::any_range`]); a CUDA IPC region is refused.
    pub fn range(
        &self,
        tenant: &str,
        field: &str,
        request: &RangeRequest,
        align: usize,
    ) -> Result<Range, ShmError> {
        match self.any_range(tenant, field, request, align)? {
            AnyRange::Posix(range) => Ok(range),
            AnyRange::Cuda(_) => Err(ShmError::InvalidArgument(format!(
                "{field}: shared memory region {:?} is GPU memory (CUDA IPC), not host memory",
                request.region
            ))),
        }
    }

    /// The range `request` names in `tenant`'s regions, checked: the region
    /// exists and is intact (else it is unregistered), the range lies within
    /// it, and its first byte is aligned to `align` bytes. A use: the idle
    /// lease restarts.
    pub fn any_range(
        &self,
        tenant: &str,
        field: &str,
        request: &RangeRequest,
        align: usize,
    ) -> Result<AnyRange, ShmError> {
        self.check_enabled()?;
        check_name(&request.region)?;
        let region = {
            let mut tables = self.tables();
            let Some(entry) = tables
                .tenants
                .get_mut(tenant)
                .and_then(|table| table.get_mut(&request.region))
            else {
                return Err(ShmError::NotFound(request.region.clone()));
            };
            entry.last_used = Instant::now();
            let region = entry.region.clone();
            if let Err(broken) = region.check_intact() {
                tables.remove(tenant, &request.region);
                return Err(broken);
            }
            region
        };
        let end = request.offset.checked_add(request.byte_size);
        if end.is_none_or(|end| end > region.byte_size()) {
            return Err(ShmError::OutOfRange(format!(
                "{field}: bytes {}..{} are outside shared memory region {:?} ({} bytes)",
                request.offset,
                request.offset as u128 + request.byte_size as u128,
                request.region,
                region.byte_size()
            )));
        }
        let region_offset = region.offset();
        let (range, address) = match region {
            Mapping::Posix(region) => {
                let range = Range::new(region, request.offset, request.byte_size);
                let address = range.address();
                (AnyRange::Posix(range), address)
            }
            Mapping::Cuda(region) => {
                let range = CudaRange::new(region, request.offset, request.byte_size);
                let address = range.address();
                (AnyRange::Cuda(range), address)
            }
        };
        if align > 1 && !address.is_multiple_of(align) {
            return Err(ShmError::InvalidArgument(format!(
                "{field}.offset: {} (+ the region's offset {region_offset}) is not a multiple of the element size {align}",
                request.offset,
            )));
        }
        Ok(range)
    }

    /// Reports a region that failed during a use (its object truncated
    /// while a call read or wrote it): unregistered if still registered.
    pub fn forget_broken(&self, tenant: &str, range: &Range) {
        let mut tables = self.tables();
        let registered = tables
            .tenants
            .get(tenant)
            .and_then(|t| t.get(range.region().name()))
            .is_some_and(|entry| {
                matches!(&entry.region, Mapping::Posix(region) if Arc::ptr_eq(region, range.region()))
            });
        if registered {
            tables.remove(tenant, range.region().name());
        }
    }

    /// Unregisters every region unused for longer than the idle lease; how
    /// many.
    pub fn expire_idle(&self) -> usize {
        let Some(idle) = self.limits.idle else {
            return 0;
        };
        let now = Instant::now();
        let mut tables = self.tables();
        let expired: Vec<(String, String)> = tables
            .tenants
            .iter()
            .flat_map(|(tenant, table)| {
                table
                    .iter()
                    .filter(|(_, e)| now.saturating_duration_since(e.last_used) > idle)
                    .map(|(name, _)| (tenant.clone(), name.clone()))
            })
            .collect();
        for (tenant, name) in &expired {
            tables.remove(tenant, name);
        }
        expired.len()
    }

    /// Bytes mapped and regions registered now, every tenant's together.
    pub fn totals(&self) -> (u64, u64) {
        let tables = self.tables();
        (tables.mapped_bytes, tables.regions)
    }
}
