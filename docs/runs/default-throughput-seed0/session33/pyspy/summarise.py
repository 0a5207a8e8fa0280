"""Inclusive sample counts by function of a py-spy raw profile: python summarise.py FILE [N]."""
import sys, collections
f = sys.argv[1]
tot = 0; incl = collections.Counter(); leaf = collections.Counter()
for line in open(f):
    stack, _, n = line.rstrip().rpartition(' ')
    n = int(n); tot += n
    frames = stack.split(';')
    seen = set()
    for fr in frames:
        k = fr.split(' (')[0] + ' ' + (fr.split('(')[-1].split(':')[0].split('/')[-1] if '(' in fr else '')
        if k not in seen: incl[k] += n; seen.add(k)
    leaf[frames[-1][:120]] += n
print(f, 'samples', tot, '(at -r R Hz for 20 s, a fully busy thread gives 20·R)')
for k, n in incl.most_common(int(sys.argv[2]) if len(sys.argv) > 2 else 30):
    print(f'{n:6d} {100*n/tot:5.1f}%  {k[:110]}')
