// A device guard for the CUDA device type on a CPU-only build of PyTorch.
//
// Python bindings of a few Tensor methods (copy_, contiguous, indexing, ...) construct a DeviceGuard
// for the tensor's device before any dispatch; on a CPU build no CUDA guard is registered and they
// fail ("PyTorch is not linked with support for cuda devices"). c10's own FakeGuardImpl tracks a
// current device and does nothing else, which is all a virtual device needs. Registered at load.
#include <c10/core/impl/DeviceGuardImplInterface.h>
#include <c10/core/impl/FakeGuardImpl.h>

C10_REGISTER_GUARD_IMPL(CUDA, c10::impl::FakeGuardImpl<c10::DeviceType::CUDA>);
