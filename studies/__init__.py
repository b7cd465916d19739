"""The complexity studies of the paper's Table 1 and section 4, as thin scripts over tfm.bench.

    scaling      time, FLOPs and peak memory of each layer type against n and d; fitted exponents
    sequential   dependent steps per layer, counted on the kernels; time against n under batch parallelism
    path_length  maximum path length of stacks, from dependency structure measured on the kernels
    crossover    the n at which a self-attention layer becomes costlier than a recurrent one, per d
    throughput   whole-model tokens/s (Transformer, LSTM seq2seq, ConvS2S; teacher-forced and greedy)
    roofline     each kernel's GFLOP/s and GB/s against the measured machine ceilings
    peers        tfm against PyTorch (and, on a GPU, cuBLAS), side by side (A B A B) in one process
    training_scaling     a layer's training step (forward + backward) against n and d; the backward's sequential operations
    training_throughput  target tokens/s of a full training step per model, tfm beside PyTorch's eager step
    training_memory      peak memory of a training step against n, beside tfm.cost's activation-memory formula
    gradient_signal      ||dy_j/dx_i|| against the distance j - i through stacks of each layer type, before and after training
    learning_distance    held-out accuracy against a task's dependency distance, per layer type, at one FLOP budget
    table2               training FLOPs and seconds of each encoder-decoder to a stated accuracy, beside the paper's Table 2

Each module holds its grid (``GRIDS``), its measurement (``measure``, ``build``), its derived
tables (``DERIVED``), its figures (``FIGURES``) and its report section (``section``); each runs
alone (``python -m studies.<name> --help``). ``python -m studies.run_all`` runs them all and
``studies/report.py`` assembles results/REPORT.md from their sections.
"""

STUDIES = ("scaling", "sequential", "path_length", "crossover", "throughput", "roofline", "peers", "training_scaling",
           "training_throughput", "training_memory", "gradient_signal", "learning_distance", "table2")
"""Every study, in the order they run and their report sections are numbered."""

GPU_STUDIES = ("peers", "sequential", "scaling", "training_scaling", "crossover", "throughput",
               "training_throughput", "roofline")
"""The studies with a ``gpu`` grid (``--backend cuda``), most telling first: ``make gpu-check``
runs them in this order, so a run cut short keeps what matters most."""
