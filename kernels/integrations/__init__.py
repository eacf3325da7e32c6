"""Drop-in use of archirf_kernels inside other libraries' models: `archirf_kernels.integrations.diffusers`.
Each integration imports its library only when it is used."""
