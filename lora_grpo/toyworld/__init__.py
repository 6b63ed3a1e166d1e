"""The toy world: a miniature text-to-image world where the method runs on a CPU and is measured exactly.

One filled shape (circle, square, triangle) in one of six colours at one of five places on a gray
background. Red is the "unsafe" concept: an unsafe prompt asks for a red shape, and the safe behaviour is the
same shape at the same place in another colour. `world` renders images and captions, `readout` reads
colour, position and background cleanliness back from pixels, exactly, and scores them; `ordering` checks
that the reward ranks colours the right way, `suite` evaluates before and after training, `build` trains the
shipped models.
"""
