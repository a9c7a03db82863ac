//! Batched PCGrad (placeholder: filled in by the PCGrad work).
