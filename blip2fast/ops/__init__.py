"""Hot ops behind one function each: a pure-PyTorch reference (defines correctness, runs anywhere) and, where
built, C++/CUDA (`blip2fast._C`) or Triton implementations. Models call ops only through this package."""
