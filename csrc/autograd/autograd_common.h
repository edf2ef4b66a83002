// Autograd of the hrgrad_ext ops in C++: one kernel per op at the Autograd dispatch key
// (device-agnostic, so the CPU and CUDA kernels need nothing), written the way PyTorch's own
// generated VariableType kernels are:
//   * the forward redispatches below autograd to the device kernel;
//   * reverse mode: a graph Node with the saved inputs. Its first-order backward calls the
//     fused backward kernel (or BLAS); when the backward itself must be differentiable
//     (create_graph, torch.func transforms, forward-over-reverse) it evaluates the same
//     vector-Jacobian product as a composition of differentiable ATen ops (and of our own
//     ops), so double backward, hessian and jacrev are exact to any order;
//   * forward mode: the tangent of every output is set from ATen formulas evaluated on
//     the primal values, exactly as ATen's forward-AD formulas are.
// Inputs that are documented as not differentiable (quadrature nodes and weights, the in-place
// accumulation) raise a clear error when they carry a gradient or a tangent, instead of
// silently returning a zero derivative.
// Host overhead per forward + backward pair (bench/bench_overhead.py): a few us, where the
// former Python registration (a torch.autograd.Function per op) cost several times more.
#pragma once

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/autograd/function.h>
#include <torch/csrc/autograd/functions/utils.h>
#include <torch/csrc/autograd/saved_variable.h>
#include <torch/library.h>

#include <torch/version.h>

#include <initializer_list>
#include <memory>
#include <mutex>
#include <string>

namespace hrgrad_ext::autograd {

using torch::autograd::Node;
using torch::autograd::SavedVariable;
using torch::autograd::TraceableFunction;
using torch::autograd::variable_list;

// How a graph node is held: torch >= 2.13 holds nodes by intrusive_ptr, earlier versions by a
// shared_ptr whose deleter (deleteNode) tears long graphs down without deep recursion, as
// their generated VariableType kernels create them. This library is built against (and only
// loaded under) one torch, so the choice is made at compile time.
#if TORCH_VERSION_MAJOR > 2 || (TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR >= 13)
template <class NodeT>
using NodePtr = c10::intrusive_ptr<NodeT>;
template <class NodeT>
NodePtr<NodeT> make_node() {
  return c10::make_intrusive<NodeT>();
}
#else
template <class NodeT>
using NodePtr = std::shared_ptr<NodeT>;
template <class NodeT>
NodePtr<NodeT> make_node() {
  return std::shared_ptr<NodeT>(new NodeT(), torch::autograd::deleteNode);
}
#endif

// The handle of op `name` of our library, looked up once per call site.
template <class Signature>
c10::TypedOperatorHandle<Signature> op_handle(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Signature>();
}

// Keys that the forward redispatches to: everything after autograd (the device kernel, or a
// fake / functionalization / batching layer above it).
inline c10::DispatchKeySet below_autograd(c10::DispatchKeySet ks) { return ks & c10::after_autograd_keyset; }

// --- forward-mode helpers -------------------------------------------------------------------

inline bool has_tangent(const at::Tensor& t) { return t.defined() && t._fw_grad(/*level=*/0).defined(); }

inline bool any_tangent(std::initializer_list<at::Tensor> ts) {
  for (const at::Tensor& t : ts) {
    if (has_tangent(t)) return true;
  }
  return false;
}

// The primal value of a dual tensor (a view without the tangent; the tensor itself otherwise).
// Tangent formulas must use primals: a tangent that carries a tangent of its own at the same
// level is not allowed.
inline at::Tensor primal(const at::Tensor& t) { return t._fw_primal(/*level=*/0); }

// The tangent of t, or zeros of t's shape when it has none (the formulas stay simple; this
// runs only under forward-mode AD).
inline at::Tensor tangent_or_zeros(const at::Tensor& t) {
  at::Tensor d = t._fw_grad(/*level=*/0);
  return d.defined() ? d : at::zeros_like(primal(t));
}

inline void set_tangent(const at::Tensor& out, const at::Tensor& tangent) {
  out._set_fw_grad(tangent, /*level=*/0, /*is_inplace_op=*/false);
}

// --- reverse-mode helpers -------------------------------------------------------------------

// Whether a backward must be built from differentiable ops: the engine enables grad mode
// only for create_graph=True (double backward, and every torch.func reverse transform),
// and a tangent on a saved tensor or an incoming gradient means forward-over-reverse.
inline bool backward_must_be_differentiable(std::initializer_list<at::Tensor> ts) {
  if (at::GradMode::is_enabled()) return true;
  return any_tangent(ts);
}

inline at::Tensor zeros_if_undefined(const at::Tensor& g, const at::Tensor& like, at::IntArrayRef shape) {
  return g.defined() ? g : at::zeros(shape, like.options());
}

// Refuses a gradient or tangent on an input the op is not differentiable in.
inline void check_not_differentiable(const char* op, const char* name, const at::Tensor& t, const char* why) {
  const bool grad = at::GradMode::is_enabled() && t.defined() && t.requires_grad();
  TORCH_CHECK(!grad && !has_tangent(t), "hrgrad_ext.", op, " is not differentiable with respect to ", name, " (",
              why, "), but ", name, grad ? " requires grad" : " has a forward-mode tangent",
              "; pass it detached (the derivative would silently be taken as zero)");
}

// Refuses autograd of the fused first-order backward kernels: they are what the backward of
// the differentiable op calls; differentiating the op twice goes through differentiable
// formulas instead, so reaching this check means the op was called directly.
inline void check_backward_kernel_not_differentiated(const char* op, std::initializer_list<at::Tensor> ts) {
  for (const at::Tensor& t : ts) {
    const bool grad = at::GradMode::is_enabled() && t.defined() && t.requires_grad();
    TORCH_CHECK(!grad && !has_tangent(t), "hrgrad_ext::", op,
                " is the fused first-order backward kernel and is not differentiable; differentiate the forward op "
                "(its double backward and forward mode use differentiable formulas)");
  }
}

// Saves the op's inputs ts into the node's slots (in order; inputs, not outputs, of the op).
inline void save_inputs(std::initializer_list<SavedVariable*> slots, std::initializer_list<at::Tensor> ts) {
  TORCH_INTERNAL_ASSERT(slots.size() == ts.size());
  auto t = ts.begin();
  for (SavedVariable* slot : slots) *slot = SavedVariable(*t++, /*is_output=*/false);
}

// Base of our graph nodes: the op name for error messages and grad_fn, the saved-tensor
// bookkeeping PyTorch's own nodes do.
struct OpBackward : public TraceableFunction {
  explicit OpBackward(const char* op) : op_(op) {}
  std::string name() const override { return std::string("hrgrad_ext::") + op_ + "_backward_node"; }
  const char* op_;
};

}  // namespace hrgrad_ext::autograd
