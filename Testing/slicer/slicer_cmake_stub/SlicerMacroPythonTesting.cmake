# Stand-in for Slicer's CMake/SlicerMacroPythonTesting.cmake. The real macros register ctests that
# run a script inside the Slicer application, which does not exist here.
macro(slicer_add_python_unittest)
endmacro()

macro(slicer_add_python_test)
endmacro()
