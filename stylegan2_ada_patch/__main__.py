"""python -m stylegan2_ada_patch PATH [--check | --revert]"""

from stylegan2_ada_patch.patcher import patch

if __name__ == '__main__':
    patch(prog_name='python -m stylegan2_ada_patch')
